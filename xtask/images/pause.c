/*
 * The pod sandbox's process (`registry.k8s.io/pause:3.6` for containerd 1.6, which pulls it from no
 * registry here): holds the pod's namespaces, sleeps until SIGINT or SIGTERM, then exits 0; as
 * PID 1 of a shared PID namespace it reaps orphaned children.
 *
 * Built by `cargo xtask images` with `gcc -Os -static -s` (xtask/src/images.rs), once per source
 * and compiler.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction on_stop = {0}, on_child = {0};
    on_stop.sa_handler = stop;
    if (sigaction(SIGINT, &on_stop, NULL) < 0 || sigaction(SIGTERM, &on_stop, NULL) < 0) {
        return 1;
    }
    on_child.sa_handler = reap;
    on_child.sa_flags = SA_NOCLDSTOP;
    if (sigaction(SIGCHLD, &on_child, NULL) < 0) {
        return 2;
    }
    for (;;) {
        pause();
    }
}
