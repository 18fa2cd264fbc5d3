# fleetgw %pre: the system user (the same as /usr/lib/sysusers.d/fleetgw.conf).
getent group fleetgw >/dev/null || groupadd --system fleetgw
getent passwd fleetgw >/dev/null || useradd --system --gid fleetgw --home-dir /var/lib/fleetgw \
    --no-create-home --shell /sbin/nologin --comment "fleetgw fleet provisioning gateway" fleetgw
exit 0
