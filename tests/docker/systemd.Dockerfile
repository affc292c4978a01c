# A Debian host with systemd as PID 1, for testing the Debian packages'
# units under a running systemd (tests/tests/packages.rs). Besides systemd,
# D-Bus and what the packages depend on (so the test installs them with
# dpkg, offline), nothing: no getty, no network or time services, no udev.
# The container shares the host's network (the tests' engine has no
# bridge), so every unit that could touch the network, the clock or the
# kernel is masked. nginx is there for the blue-green switch's test, without
# its default site (which would listen on the host's port 80) and disabled:
# the test starts it once its site is in place.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends systemd systemd-sysv dbus \
      adduser bubblewrap ca-certificates git make nginx procps \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d /etc/nginx/sites-enabled/default \
 && systemctl disable nginx.service \
 && systemctl mask \
      getty.target console-getty.service serial-getty@.service getty@.service \
      systemd-networkd.service systemd-networkd.socket systemd-networkd-wait-online.service \
      systemd-resolved.service systemd-timesyncd.service systemd-time-wait-sync.service \
      systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service \
      systemd-firstboot.service systemd-remount-fs.service systemd-hwdb-update.service \
      systemd-modules-load.service systemd-sysctl.service systemd-binfmt.service \
      systemd-random-seed.service systemd-pstore.service systemd-logind.service \
      sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
      sys-fs-fuse-connections.mount dev-hugepages.mount dev-mqueue.mount \
      proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount \
      apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
      ldconfig.service systemd-ask-password-wall.path systemd-machine-id-commit.service \
 && echo > /etc/machine-id
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/lib/systemd/systemd"]
