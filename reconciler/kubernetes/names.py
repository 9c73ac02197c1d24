"""The names and paths a rendered cluster agrees on: the objects, the Secrets' keys, where each
pod finds what. One place, read by the render, the pool's file and the Secrets."""
from __future__ import annotations

FLEET_LABEL = "cst/fleet"          # which desired file made an object (settings.kubernetes.fleet)
INSTANCE_LABEL = "cst/instance"    # which instance an object belongs to
ROLE_LABEL = "cst/role"            # instance or pool: what the NetworkPolicies select

POOL = "cst-pool"                  # the pool's workload, Service and ConfigMap
POOL_PORT = 5100
POOL_STATE = "/var/lib/cst"        # the pool's state dir in its pod
POOL_FILE = "/etc/cst/desired.yaml"
POOL_FILES = "/etc/cst/files"      # where the Secret POOL_FILES_SECRET is mounted
POOL_ENV_SECRET = "cst-pool"       # the variables the file names (*_env), as the pool's environment
POOL_FILES_SECRET = "cst-pool-files"   # the files the file names (*_file)
# a pool beyond loopback asks its clients for a key (validation.proxy_listen_problems): this
# variable holds the keys of clients other than instances, when the file names none
CLIENT_KEYS_ENV = "CST_CLIENT_KEYS"

# an instance's Secret is named after it, with these keys
PASSWORD_KEY = "password"          # its basic-auth password
PROXY_KEY_KEY = "proxy-key"        # its key to the pool
AUTH_KEY = "auth"                  # its credentials as an htpasswd line (ingress-nginx's basic auth)


def account_file(name: str, field: str) -> str:
    """The key in POOL_FILES_SECRET of an account's ``password_file`` or ``keys_file``."""
    return f"account-{name}.{field.removesuffix('_file')}"


STORE_PASSWORD_FILE = "store.password"   # the key in POOL_FILES_SECRET of usage.store_password_file


def tls_secret_of(instance_id: str) -> str:
    """The Secret cert-manager fills with an instance's own certificate."""
    return f"{instance_id}-tls"
