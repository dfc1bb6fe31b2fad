#!/usr/bin/env bash
# Run the test suite against real local services:
#
#   bash scripts/test.sh [pytest args...]
#
# 1. scripts/services.sh rabbitmq redis postgres: make sure each answers on 127.0.0.1
#    (start or install them when needed).
# 2. If RabbitMQ could not be provided that way and a Docker engine answers (`docker info`),
#    run the suite under scripts/testcontainers_broker.py, which starts a throwaway
#    rabbitmq:3.13-management container and sets BANYAN_TEST_AMQP_URL /
#    BANYAN_TEST_MANAGEMENT_URL for pytest.
# 3. Otherwise run `python3 -m pytest "$@"` and exit with its code -- except that pytest's
#    exit code 5 ("no tests collected") is reported as a failure (exit 1).
#
# Before pytest, `node` and `npm` (the interop tests in tests/interop run a Node.js service
# and npm-install its packages) are checked; when missing they are installed with
# `apt-get install -y nodejs npm` (as root). If that is impossible the run goes on with a
# warning: the interop tests then fail, saying why.
#
# Environment:
#   BANYAN_TEST_AMQP_URL   use this broker as is (services.sh does not manage RabbitMQ then;
#                          set BANYAN_TEST_MANAGEMENT_URL too if it is not on 127.0.0.1:15672)
#   BANYAN_TEST_SERVICES   services to provide; each must be up, or the run fails
#                          (default "rabbitmq redis postgres")
#   PYTHON                 interpreter (default python3)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
REQUIRED="${BANYAN_TEST_SERVICES:-rabbitmq redis postgres}"

say() { echo "test.sh: $*" >&2; }

amqp_port_open() {
    timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' >/dev/null 2>&1
}

# -- 1. services ---------------------------------------------------------------------------
services=()
for svc in ${REQUIRED}; do
    if [[ "${svc}" == rabbitmq && -n "${BANYAN_TEST_AMQP_URL:-}" ]]; then
        say "BANYAN_TEST_AMQP_URL is set: using that broker as is"
        continue
    fi
    services+=("${svc}")
done

services_rc=0
services_out=""
if ((${#services[@]} > 0)); then
    services_out="$(bash scripts/services.sh "${services[@]}")" || services_rc=$?
    printf '%s\n' "${services_out}"
fi

use_testcontainers=0
if ((services_rc != 0)); then
    # services.sh printed "<name>: FAILED: ..." for each service it could not provide.
    missing=()
    for svc in "${services[@]}"; do
        if grep -q "^${svc}: FAILED" <<<"${services_out}"; then
            missing+=("${svc}")
        fi
    done
    if ((${#missing[@]} == 0)); then
        say "FAILED: scripts/services.sh exited ${services_rc}"
        exit 1
    fi
    for svc in "${missing[@]}"; do
        if [[ "${svc}" == rabbitmq ]] && timeout 20 docker info >/dev/null 2>&1; then
            say "RabbitMQ is not available locally; Docker answers: using testcontainers"
            use_testcontainers=1
        elif [[ "${svc}" == rabbitmq ]]; then
            say "FAILED: RabbitMQ could not be provided on 127.0.0.1:5672 and no Docker" \
                "engine answers for the testcontainers fallback. Start RabbitMQ (see" \
                "scripts/services.sh) or set BANYAN_TEST_AMQP_URL."
            exit 1
        else
            say "FAILED: ${svc} could not be provided (see the services.sh lines above)." \
                "To run without it, set BANYAN_TEST_SERVICES to the services you need."
            exit 1
        fi
    done
fi

# -- Node.js for tests/interop ------------------------------------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
        say "node/npm missing: apt-get install -y nodejs npm"
        { apt-get -o DPkg::Lock::Timeout=120 update \
            && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 \
                install -y nodejs npm; } >&2 || say "apt-get install nodejs npm failed"
    fi
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        say "warning: node/npm not found and not installable here (apt-get as root);" \
            "the interop tests in tests/interop will fail"
    fi
fi

# -- 2./3. pytest ------------------------------------------------------------------------
rc=0
if ((use_testcontainers)); then
    "${PYTHON}" scripts/testcontainers_broker.py -- "${PYTHON}" -m pytest "$@" || rc=$?
else
    if [[ -z "${BANYAN_TEST_AMQP_URL:-}" ]] && ! amqp_port_open; then
        say "warning: nothing answers on 127.0.0.1:5672; tests marked 'amqp' will fail"
    fi
    "${PYTHON}" -m pytest "$@" || rc=$?
fi

if ((rc == 5)); then
    say "FAILED: pytest collected no tests (exit code 5); a run with no tests is a failure"
    exit 1
fi
exit "${rc}"
