# fleetgw %preun: $1 is 0 on erase (stop the daemon: orderly shutdown, flush), 1 on upgrade.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop fleetgw.service || :
fi
exit 0
