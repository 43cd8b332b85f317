#!/bin/sh
# Builds the Debian package of the load balancer from built binaries:
#   scripts/package.sh BIN_DIR OUT_DIR
# BIN_DIR holds lbd and lbctl (the BPF object is inside lbd); the .deb lands in
# OUT_DIR. `cargo xtask package` runs this on a release build; the package test
# runs it on the test build.
set -eu
bin=$1
out=$2
here=$(cd "$(dirname "$0")/.." && pwd)
version=$("$bin/lbd" --version | awk '{print $2}')
arch=$(dpkg --print-architecture)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

install -D -s -m 0755 "$bin/lbd" "$root/usr/sbin/lbd"
install -D -s -m 0755 "$bin/lbctl" "$root/usr/bin/lbctl"
mkdir -p "$root/usr/lib/lb"
"$bin/lbd" --write-pass-object "$root/usr/lib/lb/lb-pass.o"
chmod 0644 "$root/usr/lib/lb/lb-pass.o"
install -D -m 0644 "$here/packaging/lbd.service" "$root/lib/systemd/system/lbd.service"
install -D -m 0644 "$here/packaging/lbd.toml" "$root/etc/lb/lbd.toml"
mkdir -p "$root/usr/share/man/man8" "$root/usr/share/man/man5"
"$bin/lbd" --print-man | gzip -9n > "$root/usr/share/man/man8/lbd.8.gz"
"$bin/lbctl" man | gzip -9n > "$root/usr/share/man/man8/lbctl.8.gz"
gzip -9n < "$here/packaging/lbd.toml.5" > "$root/usr/share/man/man5/lbd.toml.5.gz"
mkdir -p "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d"
"$bin/lbctl" completions bash > "$root/usr/share/bash-completion/completions/lbctl"
"$bin/lbctl" completions zsh > "$root/usr/share/zsh/vendor-completions/_lbctl"
"$bin/lbctl" completions fish > "$root/usr/share/fish/vendor_completions.d/lbctl.fish"
mkdir -p "$root/usr/share/doc/lb"
for f in README.md docs/API.md docs/ARCHITECTURE.md; do
    install -m 0644 "$here/$f" "$root/usr/share/doc/lb/"
done
[ -f "$here/docs/DEPLOYING.md" ] && install -m 0644 "$here/docs/DEPLOYING.md" "$root/usr/share/doc/lb/"

mkdir -p "$root/DEBIAN"
echo /etc/lb/lbd.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | awk '{print $1}')
cat > "$root/DEBIAN/control" <<CONTROL
Package: lb
Version: $version
Architecture: $arch
Maintainer: lb developers <lb@example.invalid>
Installed-Size: $size
Depends: libc6, iproute2
Section: net
Priority: optional
Description: XDP load balancer with a self-organizing cluster
 lbd steers packets for virtual service addresses to backends in XDP, with a
 Maglev table per service and a connection table; LB nodes form a cluster that
 moves VIPs on failure. lbctl is its command line.
CONTROL
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTINST
chmod 0755 "$root/DEBIAN/postinst"
mkdir -p "$out"
deb="$out/lb_${version}_${arch}.deb"
fakeroot dpkg-deb --build -Zxz "$root" "$deb" >/dev/null
echo "$deb"
