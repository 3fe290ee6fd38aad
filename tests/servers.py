"""Real servers for end-to-end tests, each on a free 127.0.0.1 port in a temp dir.

The Debian packages are installed by scripts/setup.sh; these start private instances
(never the system services) and stop them at the end of the session.
"""

import os
import pwd
import shutil
import subprocess
import tempfile

from deeptrace_core import testing
from deeptrace_core.testing import free_port, wait_port  # noqa: F401 (tests and bench use them)


class Server(testing.Server):
    """A named server (the name is in its errors)."""

    def __init__(self, name, argv, port, cwd=None, user=None, env=None):
        self.name = name
        super().__init__(argv, port, what=name, cwd=cwd, user=user, env=env)


def redis():
    port = free_port()
    d = tempfile.mkdtemp(prefix="dt-redis-")
    return Server("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no", "--dir", d], port)


def memcached():
    port = free_port()
    return Server("memcached", ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0",
                                "-u", "root"], port)


def nginx(ssl=None):
    """`ssl`: (certificate, key) paths: HTTPS on the port (bench/tls.py)."""
    port = free_port()
    tls = (f" ssl;\n    ssl_certificate {ssl[0]};\n    ssl_certificate_key {ssl[1]}"
           if ssl else "")
    d = tempfile.mkdtemp(prefix="dt-nginx-")
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port}{tls};
    location / {{ return 200 "hello from nginx\\n"; }}
    location /missing {{ return 404 "no\\n"; }}
  }}
}}
""")
    return Server("nginx", ["nginx", "-c", conf, "-p", d, "-g", "daemon off;"], port)


def _pg_bin(tool):
    base = "/usr/lib/postgresql"
    version = sorted(os.listdir(base))[-1]
    return os.path.join(base, version, "bin", tool)


def postgres(*options):
    """A private cluster owned by the postgres user (the server refuses to run as root).
    `options`: more server settings, "name=value" each (passed as -c)."""
    port = free_port()
    d = tempfile.mkdtemp(prefix="dt-pg-")
    pw = pwd.getpwnam("postgres")
    os.chown(d, pw.pw_uid, pw.pw_gid)
    subprocess.run([_pg_bin("initdb"), "-D", d, "-A", "trust", "-U", "postgres"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   user="postgres")
    return Server("postgres", [_pg_bin("postgres"), "-D", d, "-p", str(port), "-k", d,
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                               *(a for o in options for a in ("-c", o))],
                  port, user="postgres")


def mariadb():
    port = free_port()
    d = tempfile.mkdtemp(prefix="dt-maria-")
    data = os.path.join(d, "data")
    installer = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    subprocess.run([installer, "--user=root", f"--datadir={data}",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    return Server("mariadb", [server, "--no-defaults", "--user=root", f"--datadir={data}",
                              f"--port={port}", "--bind-address=127.0.0.1",
                              f"--socket={d}/mysqld.sock", f"--pid-file={d}/mysqld.pid",
                              "--skip-name-resolve", "--innodb-buffer-pool-size=16M"],
                  port)
