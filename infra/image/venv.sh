# /etc/profile.d/replica-venv.sh in both images (infra/Dockerfile, infra/Dockerfile.gpu).
# The Ray cluster launcher runs every command through a login shell (`bash --login -c -i ...`), and
# a login shell reads /etc/profile, which on Debian sets PATH from scratch: the image's
# ENV PATH=/opt/venv/bin:... is gone and `python`, `ray` would be the system's or missing.
# /etc/profile reads this file last, so the image's virtualenv comes first again.
VIRTUAL_ENV=/opt/venv
export VIRTUAL_ENV
case ":${PATH}:" in
    *":${VIRTUAL_ENV}/bin:"*) ;;
    *) PATH="${VIRTUAL_ENV}/bin:${PATH}"; export PATH ;;
esac
