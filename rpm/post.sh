# packuilon %post: the directories of the shipped config (STATE_DIR,
# BUILD_FILE_DIR, CACHE_DIR, LOG_DIR), owned by the daemons' user, then the
# units the EL way (what %systemd_post expands to): on a first install,
# systemd's presets decide; 50-packuilon.preset in this package enables
# rabbit2packer.service and cdb2rabbit.timer, a site's own preset overrides
# it. Nothing is started: an unconfigured host has nothing to build (README
# "Install on EL8/EL9").
for d in /var/lib/packuilon /var/lib/packuilon/build-files /var/cache/packuilon \
         /var/cache/packuilon/profiles /var/log/packer-utils; do
    [ -d "$d" ] || install -d -o packuilon -g packuilon -m 0750 "$d"
done
if [ "$1" -eq 1 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload preset rabbit2packer.service cdb2rabbit.timer >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
