#!/usr/bin/env bash
# Make sure the local services the tests use answer on 127.0.0.1:
#
#   bash scripts/services.sh [rabbitmq] [redis] [postgres]     (default: all three)
#
# For each service: use it if it already answers; else start it if it is installed; else
# install it with apt-get (Debian, as root) and start it. One summary line per service goes to
# stdout ("rabbitmq: already up ..." / "started" / "installed+started" / "FAILED ..."); progress
# and tool output go to stderr. Exits non-zero if any named service could not be provided.
#
# RabbitMQ also gets the rabbitmq_consistent_hash_exchange and rabbitmq_management plugins
# enabled (idempotent), and we wait until the management API answers on 127.0.0.1:15672.
#
# Only localhost is ever touched. Nothing is stopped. Every wait is bounded:
#   BANYAN_SERVICE_TIMEOUT (default 120 s) for a service to come up,
#   BANYAN_APT_TIMEOUT (default 900 s) for an apt-get step.
set -euo pipefail

SERVICE_TIMEOUT="${BANYAN_SERVICE_TIMEOUT:-120}"
APT_TIMEOUT="${BANYAN_APT_TIMEOUT:-900}"
HOST=127.0.0.1
AMQP_PORT=5672
MGMT_PORT=15672
REDIS_PORT=6379
PG_PORT=5432
MGMT_USER=guest
MGMT_PASS=guest

log() { echo "services.sh: $*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

# port_open PORT: does something accept TCP connections on 127.0.0.1:PORT?
port_open() {
    timeout 3 bash -c "exec 3<>/dev/tcp/${HOST}/$1" >/dev/null 2>&1
}

# wait_until SECONDS WHAT CMD...: run CMD until it succeeds or SECONDS have passed.
wait_until() {
    local limit="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "gave up waiting ${limit}s for ${what}"
            return 1
        fi
        sleep 1
    done
}

APT_UPDATED=0
# apt_install PKG...: install Debian packages (root + apt-get only).
apt_install() {
    if ! have apt-get; then
        log "apt-get not found: cannot install $*"
        return 1
    fi
    if [[ "$(id -u)" != 0 ]]; then
        log "not root: cannot apt-get install $*"
        return 1
    fi
    if [[ "${APT_UPDATED}" == 0 ]]; then
        log "apt-get update"
        timeout "${APT_TIMEOUT}" apt-get -o DPkg::Lock::Timeout=120 update >&2 || return 1
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive timeout "${APT_TIMEOUT}" \
        apt-get -o DPkg::Lock::Timeout=120 install -y "$@" >&2 || return 1
}

# ---------------------------------------------------------------------------------- RabbitMQ

mgmt_ok() {
    local url="http://${HOST}:${MGMT_PORT}/api/overview"
    if have curl; then
        curl -fsS -m 5 -o /dev/null -u "${MGMT_USER}:${MGMT_PASS}" "${url}" 2>/dev/null
    else
        timeout 10 python3 - "${url}" "${MGMT_USER}" "${MGMT_PASS}" >/dev/null 2>&1 <<'EOF'
import base64, sys, urllib.request
url, user, password = sys.argv[1:4]
req = urllib.request.Request(url)
token = base64.b64encode(f"{user}:{password}".encode()).decode()
req.add_header("Authorization", "Basic " + token)
with urllib.request.urlopen(req, timeout=5) as resp:
    sys.exit(0 if resp.status == 200 else 1)
EOF
    fi
}

rabbit_node_running() {
    timeout 30 rabbitmqctl -q ping >/dev/null 2>&1
}

rabbit_await() {
    timeout 60 rabbitmqctl await_startup >&2 2>/dev/null
}

start_rabbitmq() {
    if rabbit_node_running; then
        log "rabbitmq: node is running but port ${AMQP_PORT} is not open yet; waiting"
    else
        log "rabbitmq-server -detached"
        rabbitmq-server -detached >&2 || {
            log "rabbitmq-server -detached failed"
            return 1
        }
    fi
    # await_startup fails at once while the node is not yet registered: retry it until the
    # deadline.
    wait_until "${SERVICE_TIMEOUT}" "rabbitmqctl await_startup" rabbit_await || return 1
    wait_until "${SERVICE_TIMEOUT}" "RabbitMQ on ${HOST}:${AMQP_PORT}" port_open "${AMQP_PORT}"
}

# The tests make a vhost per test. RabbitMQ 3.10 can wedge its vhost machinery (every
# vhost create then hangs) after a vhost was deleted while a client reconnected into it;
# only restarting the rabbit application clears that. Probe it, restart if wedged.
vhost_probe() {
    local name="banyan-probe-$$"
    curl -fsS -m 20 -u "${MGMT_USER}:${MGMT_PASS}" -X PUT \
        "http://${HOST}:${MGMT_PORT}/api/vhosts/${name}" >/dev/null 2>&1 || return 1
    curl -fsS -m 20 -u "${MGMT_USER}:${MGMT_PASS}" -X DELETE \
        "http://${HOST}:${MGMT_PORT}/api/vhosts/${name}" >/dev/null 2>&1
}

vhosts_ok() {
    have curl || return 0
    if vhost_probe; then
        return 0
    fi
    if ! have rabbitmqctl; then
        echo "rabbitmq: FAILED: creating a vhost hangs and rabbitmqctl is not here to restart it"
        return 1
    fi
    log "rabbitmq: creating a vhost hangs; restarting the rabbit application"
    timeout 300 rabbitmqctl stop_app >&2 || true
    timeout 300 rabbitmqctl start_app >&2 || true
    if wait_until "${SERVICE_TIMEOUT}" "rabbitmqctl await_startup" rabbit_await &&
        wait_until "${SERVICE_TIMEOUT}" "management API on ${HOST}:${MGMT_PORT}" mgmt_ok &&
        vhost_probe; then
        return 0
    fi
    restart_rabbit_node || return 1
    if vhost_probe; then
        return 0
    fi
    echo "rabbitmq: FAILED: creating a vhost still hangs after restarting the node"
    return 1
}

# An application restart has been seen to leave 3.10 half-started (its internal tables gone,
# await_startup never returning) when the node held many quorum queues. Only a restart of
# the whole node cleared that; recovering those queues can take minutes, hence the longer
# wait (BANYAN_NODE_RESTART_TIMEOUT, default 600 s).
restart_rabbit_node() {
    local limit="${BANYAN_NODE_RESTART_TIMEOUT:-600}"
    log "rabbitmq: still wedged; restarting the node (rabbitmqctl stop, rabbitmq-server -detached)"
    timeout 120 rabbitmqctl stop >&2 || true
    wait_until 120 "the node to stop" rabbit_node_stopped || return 1
    rabbitmq-server -detached >&2 || return 1
    wait_until "${limit}" "rabbitmqctl await_startup" rabbit_await || return 1
    wait_until "${limit}" "RabbitMQ on ${HOST}:${AMQP_PORT}" port_open "${AMQP_PORT}" || return 1
    wait_until "${limit}" "management API on ${HOST}:${MGMT_PORT}" mgmt_ok
}

rabbit_node_stopped() {
    ! rabbit_node_running
}

ensure_rabbitmq() {
    local action
    if port_open "${AMQP_PORT}"; then
        action="already up"
    else
        if ! have rabbitmq-server; then
            apt_install rabbitmq-server || {
                echo "rabbitmq: FAILED: nothing answers on ${HOST}:${AMQP_PORT}, rabbitmq-server" \
                    "is not installed and could not be installed (needs apt-get and root)"
                return 1
            }
            action="installed+started"
        else
            action="started"
        fi
        # The package's install script may already have started it.
        if ! port_open "${AMQP_PORT}"; then
            start_rabbitmq || {
                echo "rabbitmq: FAILED: could not start rabbitmq-server (see its logs under" \
                    "/var/log/rabbitmq)"
                return 1
            }
        fi
    fi

    local plugins="plugins not managed (rabbitmq-plugins not installed here)"
    if have rabbitmq-plugins; then
        log "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange rabbitmq_management"
        if timeout "${SERVICE_TIMEOUT}" rabbitmq-plugins enable \
            rabbitmq_consistent_hash_exchange rabbitmq_management >&2; then
            plugins="plugins consistent_hash_exchange+management enabled"
        else
            echo "rabbitmq: FAILED: ${action} on ${HOST}:${AMQP_PORT}, but rabbitmq-plugins" \
                "enable failed"
            return 1
        fi
    fi
    if wait_until "${SERVICE_TIMEOUT}" "management API on ${HOST}:${MGMT_PORT}" mgmt_ok; then
        vhosts_ok || return 1
        echo "rabbitmq: ${action} on ${HOST}:${AMQP_PORT}; ${plugins};" \
            "management API answers on http://${HOST}:${MGMT_PORT}"
    else
        echo "rabbitmq: FAILED: ${action} on ${HOST}:${AMQP_PORT}, ${plugins}, but the" \
            "management API does not answer on http://${HOST}:${MGMT_PORT} (${MGMT_USER})"
        return 1
    fi
}

# ------------------------------------------------------------------------------------- Redis

redis_up() {
    if have redis-cli; then
        [[ "$(timeout 3 redis-cli -h "${HOST}" -p "${REDIS_PORT}" ping 2>/dev/null)" == PONG ]]
    else
        port_open "${REDIS_PORT}"
    fi
}

start_redis() {
    mkdir -p /var/lib/redis /var/log/redis
    log "redis-server --daemonize yes --port ${REDIS_PORT}"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "${REDIS_PORT}" \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log >&2 ||
        return 1
    wait_until "${SERVICE_TIMEOUT}" "Redis on ${HOST}:${REDIS_PORT}" redis_up
}

ensure_redis() {
    local action
    if redis_up; then
        echo "redis: already up on ${HOST}:${REDIS_PORT}"
        return 0
    fi
    if ! have redis-server; then
        apt_install redis-server || {
            echo "redis: FAILED: nothing answers on ${HOST}:${REDIS_PORT}, redis-server is not" \
                "installed and could not be installed (needs apt-get and root)"
            return 1
        }
        action="installed+started"
    else
        action="started"
    fi
    if ! redis_up; then
        start_redis || {
            echo "redis: FAILED: could not start redis-server (see /var/log/redis/ci.log)"
            return 1
        }
    fi
    echo "redis: ${action} on ${HOST}:${REDIS_PORT}"
}

# -------------------------------------------------------------------------------- PostgreSQL

pg_up() {
    if have pg_isready; then
        timeout 5 pg_isready -q -h "${HOST}" -p "${PG_PORT}"
    else
        port_open "${PG_PORT}"
    fi
}

pg_version() {
    ls /etc/postgresql 2>/dev/null | sort -V | head -1
}

start_postgres() {
    local ver
    ver="$(pg_version)"
    if [[ -z "${ver}" ]]; then
        log "no cluster under /etc/postgresql"
        return 1
    fi
    log "pg_ctlcluster --skip-systemctl-redirect ${ver} main start"
    # Exit code 2 means "already running" (it may still be starting up); wait below anyway.
    timeout "${SERVICE_TIMEOUT}" pg_ctlcluster --skip-systemctl-redirect "${ver}" main start >&2 ||
        log "pg_ctlcluster exited $? (waiting for the server anyway)"
    wait_until "${SERVICE_TIMEOUT}" "PostgreSQL on ${HOST}:${PG_PORT}" pg_up
}

# After a fresh install, set up what the machines come with: trust auth on localhost and the
# socket, a superuser role "root" and databases "test" and "root".
configure_fresh_postgres() {
    local ver hba
    ver="$(pg_version)"
    hba="/etc/postgresql/${ver}/main/pg_hba.conf"
    if [[ -f "${hba}" ]] && ! grep -q "banyan_bus services.sh" "${hba}"; then
        log "pg_hba.conf: trust for the local socket and 127.0.0.1/::1"
        {
            echo "# added by banyan_bus services.sh (test machine): trust local connections"
            echo "local all all trust"
            echo "host all all 127.0.0.1/32 trust"
            echo "host all all ::1/128 trust"
            cat "${hba}"
        } >"${hba}.new"
        mv "${hba}.new" "${hba}"
        chown postgres:postgres "${hba}" 2>/dev/null || true
        timeout 60 pg_ctlcluster --skip-systemctl-redirect "${ver}" main reload >&2 || true
    fi
    local psql=(timeout 30 psql -h "${HOST}" -p "${PG_PORT}" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
    if [[ "$("${psql[@]}" -c "select 1 from pg_roles where rolname = 'root'")" != 1 ]]; then
        "${psql[@]}" -c "create role root superuser login" >&2 || true
    fi
    local db
    for db in test root; do
        if [[ "$("${psql[@]}" -c "select 1 from pg_database where datname = '${db}'")" != 1 ]]; then
            "${psql[@]}" -c "create database ${db}" >&2 || true
        fi
    done
}

ensure_postgres() {
    local action
    if pg_up; then
        echo "postgres: already up on ${HOST}:${PG_PORT}"
        return 0
    fi
    if ! have pg_ctlcluster || [[ -z "$(pg_version)" ]]; then
        apt_install postgresql || {
            echo "postgres: FAILED: nothing answers on ${HOST}:${PG_PORT}, PostgreSQL is not" \
                "installed and could not be installed (needs apt-get and root)"
            return 1
        }
        action="installed+started"
    else
        action="started"
    fi
    if ! pg_up; then
        start_postgres || {
            echo "postgres: FAILED: could not start the cluster (see /var/log/postgresql)"
            return 1
        }
    fi
    if [[ "${action}" == "installed+started" ]]; then
        configure_fresh_postgres || log "postgres: post-install configuration incomplete"
    fi
    echo "postgres: ${action} on ${HOST}:${PG_PORT}"
}

# -------------------------------------------------------------------------------------- main

if [[ $# -eq 0 ]]; then
    set -- rabbitmq redis postgres
fi

status=0
for svc in "$@"; do
    case "${svc}" in
        rabbitmq | rabbit | amqp) ensure_rabbitmq || status=1 ;;
        redis) ensure_redis || status=1 ;;
        postgres | postgresql | pg) ensure_postgres || status=1 ;;
        -h | --help)
            sed -n '2,16p' "$0"
            exit 0
            ;;
        *)
            echo "services.sh: unknown service '${svc}' (expected rabbitmq, redis, postgres)" >&2
            status=2
            ;;
    esac
done
exit "${status}"
