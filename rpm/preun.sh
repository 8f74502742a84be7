# packuilon %preun (what %systemd_preun expands to): on erase, not on an
# upgrade, the units are disabled and stopped.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now rabbit2packer.service cdb2rabbit.timer >/dev/null 2>&1 || :
    systemctl stop cdb2rabbit.service >/dev/null 2>&1 || :
fi
exit 0
