# packuilon %postun (what %systemd_postun_with_restart expands to): systemd
# forgets removed units; on an upgrade a running rabbit2packer restarts on
# the new binary (its journal makes that safe: a running build is rebuilt,
# waiting jobs wait). Config, state, logs and the user stay, as on EL.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart rabbit2packer.service >/dev/null 2>&1 || :
    fi
fi
exit 0
