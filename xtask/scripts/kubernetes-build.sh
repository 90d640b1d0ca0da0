#!/bin/bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler and kubelet from Debian's `kubernetes`
# source package (1.20.2) with Debian's Go 1.19, once, into $1/bin (a cache outside the clone).
# Idempotent: exits at once when the four binaries exist. Installs nothing system-wide: the source,
# Go and helpers are unpacked under $1. See ../shared/notes/kube-apiserver.md for why each step is here.
set -euo pipefail
S=${1:?usage: kubernetes-build.sh CACHE_DIR}
BINS="kube-apiserver kube-controller-manager kube-scheduler kubelet"
have=1; for b in $BINS; do [ -x "$S/bin/$b" ] || have=0; done
if [ $have = 1 ]; then echo "Kubernetes binaries: present ($S/bin)"; exit 0; fi
mkdir -p "$S" && cd "$S"
echo "building Kubernetes 1.20 from Debian's source package into $S (about 7 minutes on an idle 2-core machine, once)"

# A private apt configuration that also sees deb-src; the system's lists are not touched.
mkdir -p apt/lists/partial apt/cache/archives/partial apt/etc/none.d
sed 's/^Types: deb$/Types: deb deb-src/' /etc/apt/sources.list.d/debian.sources > apt/etc/debian.sources
cat > apt/apt.conf <<X
Dir::Etc::SourceList "$S/apt/etc/debian.sources";
Dir::Etc::SourceParts "$S/apt/etc/none.d";
Dir::State::Lists "$S/apt/lists";
Dir::Cache "$S/apt/cache";
X
export APT_CONFIG=$S/apt/apt.conf
apt-get update -qq
if [ ! -d src/k8s ]; then
  rm -rf src && mkdir -p src
  (cd src && apt-get source -qq --download-only kubernetes && dpkg-source -x kubernetes_*.dsc k8s.tmp >/dev/null && mv k8s.tmp k8s)
fi
if [ ! -d root/usr/lib/go-1.19 ]; then
  rm -rf debs root && mkdir -p debs root
  (cd debs && apt-get download -qq golang-1.19-go golang-1.19-src rsync libpopt0 \
      golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
  for d in debs/*.deb; do dpkg-deb -x "$d" root; done
fi
# The vendored reflect2 1.0.1 / json-iterator 1.1.10 crash when built with Go >= 1.18: use Debian's.
V=src/k8s/vendor/github.com; D=root/usr/share/gocode/src/github.com
for p in modern-go/reflect2 json-iterator/go; do
  find $V/$p -maxdepth 1 \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' -delete
  find $D/$p -maxdepth 1 \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' -exec cp {} $V/$p/ \;
done
export R=$S/root
export GOROOT=$R/usr/lib/go-1.19
export PATH=$GOROOT/bin:$R/usr/bin:$PATH
export LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu
export CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor
export GOCACHE=$S/gocache GOPATH=$S/gopath HOME=$S/home
export KUBE_STATIC_OVERRIDES=kubelet
mkdir -p home
cd src/k8s
nice -n 10 make generated_files
nice -n 10 make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet"
mkdir -p "$S/bin.tmp"
for b in $BINS; do cp "_output/bin/$b" "$S/bin.tmp/"; done
rm -rf "$S/bin" && mv "$S/bin.tmp" "$S/bin"
# The build tree (2+ GB), the unpacked source, Go and the downloads are not needed again: only
# bin/ (about 360 MB) stays. A missing binary later rebuilds from scratch.
cd "$S"
rm -rf src/k8s/_output gocache gopath src root debs apt/cache
echo "Kubernetes binaries built: $S/bin"
