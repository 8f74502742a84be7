# packuilon %pre: the packuilon system user and group, before the files
# (config.ini is root:packuilon 0640) are laid down. As Fedora's packaging
# guidelines do it without sysusers; kept on erase (files it owned may remain).
getent group packuilon >/dev/null || groupadd -r packuilon
getent passwd packuilon >/dev/null || \
    useradd -r -g packuilon -d /var/lib/packuilon -M -s /sbin/nologin \
        -c "Packuilon image builder" packuilon
exit 0
