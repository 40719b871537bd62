#!/bin/sh
# Builds the QEMU test guest for tests/qemu_e2e.rs: a Debian cloud kernel plus a busybox initramfs
# whose /init configures eth0 by DHCP and runs the checks named on the kernel command line.
#
#   build-guest.sh OUT_DIR KERNEL MODULES_DIR
#
# OUT_DIR gets vmlinuz and initrd.gz (written to temporaries and renamed, so a reader never sees
# half a file). KERNEL is a vmlinuz-*-cloud-amd64, MODULES_DIR its /lib/modules/<version>.
# Needs only busybox (static) on the host: its cpio and gzip applets pack the image.
set -eu

out=$1
kernel=$2
moddir=$3
busybox=$(command -v busybox)

[ -f "$kernel" ] || { echo "build-guest: no kernel at $kernel" >&2; exit 1; }
[ -d "$moddir" ] || { echo "build-guest: no module directory $moddir" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/lib/modules" \
    "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/www" "$root/etc" "$root/run"

cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done

# The virtio network modules, in load order; a module built into the kernel has no .ko and is
# skipped. Compressed modules are unpacked (busybox insmod wants a plain ELF file).
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover \
    net_failover virtio_net; do
    f=$(find "$moddir/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o \
        -name "$m.ko.gz" | head -n 1)
    if [ -z "$f" ]; then
        if grep -q "/$m.ko" "$moddir/modules.builtin" 2>/dev/null; then
            continue
        fi
        echo "build-guest: module $m is neither in $moddir nor built in" >&2
        exit 1
    fi
    case "$f" in
        *.xz) "$busybox" xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
        *.gz) "$busybox" gzip -dc "$f" > "$root/lib/modules/$m.ko" ;;
        *.zst) zstd -dc "$f" > "$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
    echo "$m" >> "$root/lib/modules/order"
done

cat > "$root/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc event script: applies the lease (with its MTU) and records it in /tmp/lease.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set dev "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
        for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        {
            echo "ip=$ip"
            echo "mask=$mask"
            echo "router=$router"
            echo "dns=$dns"
            echo "mtu=$mtu"
            echo "serverid=$serverid"
            echo "lease=$lease"
        } > /tmp/lease
        ;;
esac
exit 0
EOF
chmod 755 "$root/udhcpc.script"

cat > "$root/init" <<'EOF'
#!/bin/sh
# The usernet test guest. Kernel command line parameters (read from /proc/cmdline):
#   usernet.checks=a,b,c   checks to run after DHCP, in order (see check_* below)
#   usernet.ip=IP|any usernet.router=IP usernet.dns=IP usernet.mtu=N   expected lease
#   usernet.http=URL usernet.sha=HEX         file to fetch and its sha256
#   usernet.peer=IP|auto                     another guest's httpd to fetch (auto: .15 <-> .16)
#   usernet.bigdown=HOST:PORT usernet.bigdownsha=HEX   read a stream to EOF, check its sha256
#   usernet.bigup=HOST:PORT usernet.bigupn=N usernet.bigupsha=HEX
#                                            send the http file N times, check the sink's answer
# Every check prints one line `RESULT name ok|fail detail`; then `RESULT done ...`. A guest
# whose checks include `serve` then reads commands from the console (`run TAG check...`, whose
# results are named TAG.check, then `RESULT TAG.done`; `poweroff`); others power off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
exec 0</dev/console 1>/dev/console 2>&1
stty -echo 2>/dev/null

param() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "usernet.$1="*) echo "${w#usernet.$1=}"; return 0 ;; esac
    done
    echo "$2"
}
tag=
result() { name=$1; shift; echo "RESULT $tag$name $*"; }
lease() { sed -n "s/^$1=//p" /tmp/lease 2>/dev/null; }

echo "GUEST booting: $(uname -r)"
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || echo "GUEST insmod $m failed"
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 >/dev/null 2>&1
ip link set lo up
ip link set eth0 up
MAC=$(cat /sys/class/net/eth0/address)
echo "GUEST eth0 $MAC"

dhcp_run() {
    rm -f /tmp/lease
    udhcpc -i eth0 -O mtu -s /udhcpc.script -n -q -t 10 -T 1 > /tmp/udhcpc.log 2>&1
}

check_dhcp() {
    [ -f /tmp/lease ] || dhcp_run
    if [ ! -f /tmp/lease ]; then
        result dhcp fail "no lease: $(tr '\n' ' ' < /tmp/udhcpc.log)"
        return
    fi
    ip=$(lease ip); mask=$(lease mask); router=$(lease router); dns=$(lease dns)
    mtu=$(lease mtu)
    linkmtu=$(cat /sys/class/net/eth0/mtu)
    detail="ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu linkmtu=$linkmtu mac=$MAC"
    want_ip=$(param ip 192.168.5.15)
    bad=
    [ "$want_ip" = any ] || [ "$ip" = "$want_ip" ] || bad="$bad ip"
    [ "$mask" = "$(param mask 24)" ] || bad="$bad mask"
    [ "$router" = "$(param router 192.168.5.2)" ] || bad="$bad router"
    [ "$dns" = "$(param dns 192.168.5.3)" ] || bad="$bad dns"
    [ "$mtu" = "$(param mtu 1500)" ] || bad="$bad mtu"
    [ "$linkmtu" = "$(param mtu 1500)" ] || bad="$bad linkmtu"
    if [ -z "$bad" ]; then result dhcp ok "$detail"; else result dhcp fail "wrong:$bad $detail"; fi
}

check_renew() {
    dhcp_run
    check_dhcp
}

check_dns() {
    name=$(param dnsname host.lima.internal)
    want=$(param dnswant 192.168.5.2)
    out=$(timeout 10 nslookup "$name" "$(param dns 192.168.5.3)" 2>&1)
    got=$(echo "$out" | sed -n '/^Name:/,$s/^Address:* *\([0-9.]*\).*/\1/p' | head -n 1)
    if [ "$got" = "$want" ]; then
        result dns ok "$name=$got"
    else
        result dns fail "$name: want $want, got '$got': $(echo "$out" | tr '\n' ' ')"
    fi
}

check_http() {
    url=$(param http)
    rm -f /tmp/blob
    if ! out=$(timeout 60 wget -q -O /tmp/blob "$url" 2>&1); then
        result http fail "wget $url: $out"
        return
    fi
    sha=$(sha256sum /tmp/blob | cut -d' ' -f1)
    size=$(wc -c < /tmp/blob)
    if [ "$sha" = "$(param sha)" ]; then
        result http ok "bytes=$size sha=$sha"
    else
        result http fail "bytes=$size sha=$sha want $(param sha)"
    fi
}

check_ping() {
    out=$(ping -c 3 -W 5 "$(param router 192.168.5.2)" 2>&1)
    st=$?
    line=$(echo "$out" | grep 'packets transmitted')
    if [ $st = 0 ]; then result ping ok "$line"; else result ping fail "$(echo "$out" | tr '\n' ' ')"; fi
}

check_serve() {
    echo "usernet-guest ip=$(lease ip) mac=$MAC" > /www/index.html
    httpd -p 80 -h /www
    i=0
    while ! netstat -ltn 2>/dev/null | grep -q ':80 ' && [ $i -lt 50 ]; do usleep 100000; i=$((i+1)); done
    if netstat -ltn 2>/dev/null | grep -q ':80 '; then
        result serve ok "httpd on :80"
    else
        result serve fail "httpd did not listen"
    fi
}

check_peer() {
    peer=$(param peer auto)
    if [ "$peer" = auto ]; then
        case "$(lease ip)" in
            192.168.5.15) peer=192.168.5.16 ;;
            *) peer=192.168.5.15 ;;
        esac
    fi
    i=0
    while [ $i -lt 120 ]; do
        page=$(timeout 10 wget -q -O - "http://$peer/" 2>/dev/null)
        case "$page" in *"ip=$peer "*) result peer ok "$page"; return ;; esac
        sleep 1
        i=$((i+1))
    done
    result peer fail "no page from $peer (last: '$page')"
}

check_bigdown() {
    hp=$(param bigdown)
    t0=$(cut -d' ' -f1 /proc/uptime)
    sha=$(timeout 300 nc "${hp%:*}" "${hp#*:}" < /dev/null | sha256sum | cut -d' ' -f1)
    t1=$(cut -d' ' -f1 /proc/uptime)
    if [ "$sha" = "$(param bigdownsha)" ]; then
        result bigdown ok "sha=$sha secs=$t0-$t1"
    else
        result bigdown fail "sha=$sha want $(param bigdownsha) secs=$t0-$t1"
    fi
}

check_bigup() {
    hp=$(param bigup)
    n=$(param bigupn 1)
    t0=$(cut -d' ' -f1 /proc/uptime)
    reply=$(i=0; while [ $i -lt "$n" ]; do cat /tmp/blob; i=$((i+1)); done | timeout 300 nc "${hp%:*}" "${hp#*:}")
    t1=$(cut -d' ' -f1 /proc/uptime)
    want="$(( $(wc -c < /tmp/blob) * n )) $(param bigupsha)"
    if [ "$reply" = "$want" ]; then
        result bigup ok "sink=$reply secs=$t0-$t1"
    else
        result bigup fail "sink='$reply' want '$want' secs=$t0-$t1"
    fi
}

run_checks() {
    for c in $(echo "$1" | tr ',' ' '); do
        if type "check_$c" >/dev/null 2>&1; then "check_$c"; else result "$c" fail "unknown check"; fi
    done
}

checks=$(param checks dhcp)
dhcp_run
run_checks "$checks"
result done "mac=$MAC"
case ",$checks," in
    *,serve,*)
        while read -r cmd t rest; do
            case "$cmd" in
                run) tag="$t."; run_checks "$(echo $rest | tr ' ' ',')"; result done; tag= ;;
                poweroff) break ;;
            esac
        done
        ;;
esac
echo "GUEST powering off"
poweroff -f
EOF
chmod 755 "$root/init"

(cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null) | "$busybox" gzip -9 > "$work/initrd.gz"
cp "$kernel" "$work/vmlinuz"
mv "$work/initrd.gz" "$out/initrd.gz"
mv "$work/vmlinuz" "$out/vmlinuz"
echo "build-guest: $out/vmlinuz $out/initrd.gz ($(wc -c < "$out/initrd.gz") bytes) from $kernel"
