# fleetgw %postun: /var/lib/fleetgw (state) and a modified /etc/fleetgw/gateway.toml
# (kept as .rpmsave) stay after an erase.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
fi
exit 0
