# fleetgw %post: directories and systemd told about the unit; never enabled or started here.
# $1 is 1 on install, 2 on upgrade: an upgrade restarts the daemon only if it runs.
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create fleetgw.conf || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -ge 2 ]; then
        systemctl try-restart fleetgw.service || :
    fi
fi
exit 0
