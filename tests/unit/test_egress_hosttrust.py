"""What a sandbox inherits from the host: read from fixture trees, turned into env/binds/files."""

from __future__ import annotations

from pathlib import Path

from cellbox.egress.hosttrust import APT_PROXY_CONF, proxy_env, read_host_config, sandbox_trust

HOME = "/home/op"


def write(root: Path, path: str, text: str = "") -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def host_tree(root: Path) -> None:
    write(root, "/etc/ssl/certs/ca-certificates.crt", "-----BEGIN CERTIFICATE-----\n")
    write(
        root,
        "/etc/xdg/pip/pip.conf",
        "[global]\nconstraint = /etc/xdg/pip/constraints.txt\nindex-url = https://mirror.example/simple\n",
    )
    write(root, "/etc/xdg/pip/constraints.txt", "torch<=2\n")
    write(
        root,
        f"{HOME}/.config/pip/pip.conf",
        "[global]\nfind-links = /opt/wheels\nextra-index-url = file:///opt/pypi/simple\n"
        "    https://user:secret@private.example/simple\n[install]\ntrusted-host = mirror.example\n",
    )
    write(root, "/opt/wheels/a-1-py3-none-any.whl")
    write(root, "/opt/pypi/simple/a/index.html", '<a href="../../files/a-1.whl#sha256=00">a</a>')
    write(root, "/opt/pypi/files/a-1.whl")
    write(root, "/etc/npmrc", "cafile=/etc/ssl/certs/ca-certificates.crt\nregistry = https://npm.mirror.example/\n")
    write(root, f"{HOME}/.npmrc", "//npm.mirror.example/:_authToken=SECRET\nstrict-ssl=true\n")
    write(
        root,
        "/etc/apt/sources.list.d/debian.sources",
        "Types: deb\nURIs: http://deb.mirror.example/debian\nSuites: bookworm\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )
    write(
        root,
        "/etc/apt/sources.list.d/old.list",
        "deb [signed-by=/usr/share/keyrings/old.gpg] http://old.example/ x main\n",
    )
    write(root, "/etc/apt/sources.list.d/off.list.disabled", "deb http://off.example/ x main\n")
    write(root, "/usr/share/keyrings/debian-archive-keyring.gpg")
    write(root, "/usr/share/keyrings/old.gpg")


def test_reads_pip_in_pips_order_and_env_wins(tmp_path: Path) -> None:
    host_tree(tmp_path)
    config = read_host_config(tmp_path, env={}, home=HOME)
    assert config.ca_bundle == "/etc/ssl/certs/ca-certificates.crt"
    pip = config.pip
    assert pip.index_url == "https://mirror.example/simple"
    assert pip.extra_index_urls == ("file:///opt/pypi/simple", "https://user:secret@private.example/simple")
    assert pip.find_links == ("/opt/wheels",)
    assert pip.trusted_hosts == ("mirror.example",)
    assert pip.constraints == ("/etc/xdg/pip/constraints.txt",)
    overridden = read_host_config(
        tmp_path, env={"PIP_INDEX_URL": "https://other.example/simple", "PIP_FIND_LINKS": ""}, home=HOME
    )
    assert overridden.pip.index_url == "https://other.example/simple"
    assert overridden.pip.find_links == ()
    assert read_host_config(tmp_path, env={"PIP_CONFIG_FILE": "/dev/null"}, home=HOME).pip.index_url is None


def test_sandbox_gets_proxy_ca_and_indexes_but_no_secrets(tmp_path: Path) -> None:
    host_tree(tmp_path)
    trust = sandbox_trust(read_host_config(tmp_path, env={}, home=HOME), 3128)
    env = trust.env
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[key] == "http://127.0.0.1:3128"
    assert env["ALL_PROXY"] == env["all_proxy"] == "socks5h://127.0.0.1:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"
    ca = "/etc/ssl/certs/ca-certificates.crt"
    for key in (
        "SSL_CERT_FILE",
        "PIP_CERT",
        "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
    ):
        assert env[key] == ca
    assert env["PIP_INDEX_URL"] == "https://mirror.example/simple"
    assert env["PIP_EXTRA_INDEX_URL"] == "file:///opt/pypi/simple"  # the one with credentials is left out
    assert env["PIP_FIND_LINKS"] == "/opt/wheels"
    assert env["PIP_TRUSTED_HOST"] == "mirror.example"
    assert env["PIP_CONSTRAINT"] == "/etc/xdg/pip/constraints.txt"
    assert env["npm_config_registry"] == "https://npm.mirror.example/"
    assert env["npm_config_proxy"] == "http://127.0.0.1:3128"
    assert "PIP_RETRIES" not in env
    assert not any("SECRET" in v or "secret" in v for v in env.values())
    assert any("credentials" in note for note in trust.notes)
    targets = {bind.target: bind.source for bind in trust.binds}
    assert targets[ca] == tmp_path / ca.lstrip("/")
    assert "/opt/pypi" in targets  # the index's root: its links go to ../../files/
    assert {"/opt/wheels", "/etc/xdg/pip/constraints.txt"} <= set(targets)
    assert {"/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list.d/old.list"} <= set(targets)
    assert {"/usr/share/keyrings/debian-archive-keyring.gpg", "/usr/share/keyrings/old.gpg"} <= set(targets)
    assert "/etc/apt/sources.list.d/off.list.disabled" not in targets
    assert f"{HOME}/.npmrc" not in targets
    apt = trust.files[APT_PROXY_CONF]
    assert 'Acquire::http::Proxy "http://127.0.0.1:3128";' in apt and ca in apt


def test_no_egress_sandbox_keeps_local_indexes_and_fails_fast(tmp_path: Path) -> None:
    host_tree(tmp_path)
    trust = sandbox_trust(read_host_config(tmp_path, env={}, home=HOME), None, include_apt=False)
    assert "HTTP_PROXY" not in trust.env and "npm_config_proxy" not in trust.env
    assert trust.env["PIP_RETRIES"] == "0"
    assert trust.env["PIP_FIND_LINKS"] == "/opt/wheels"
    assert APT_PROXY_CONF not in trust.files
    assert not any(b.target.startswith("/etc/apt") for b in trust.binds)


def test_missing_paths_are_noted_not_bound(tmp_path: Path) -> None:
    write(tmp_path, "/etc/pip.conf", "[global]\nfind-links = /nowhere relative/dir\nconstraint = /gone.txt\n")
    trust = sandbox_trust(read_host_config(tmp_path, env={}, home=HOME), 3128)
    assert trust.binds == []
    assert "PIP_FIND_LINKS" not in trust.env and "PIP_CONSTRAINT" not in trust.env
    assert "SSL_CERT_FILE" not in trust.env
    assert len(trust.notes) == 3


def test_ca_bundle_from_env_wins_over_the_distribution_one(tmp_path: Path) -> None:
    host_tree(tmp_path)
    write(tmp_path, "/srv/corp-ca.pem", "-----BEGIN CERTIFICATE-----\n")
    config = read_host_config(tmp_path, env={"SSL_CERT_FILE": "/srv/corp-ca.pem"}, home=HOME)
    assert config.ca_bundle == "/srv/corp-ca.pem"
    assert sandbox_trust(config, 1080).env["PIP_CERT"] == "/srv/corp-ca.pem"


def test_proxy_env_without_socks() -> None:
    env = proxy_env(8080, socks_all_proxy=False)
    assert "ALL_PROXY" not in env and "all_proxy" not in env
    assert env["https_proxy"] == "http://127.0.0.1:8080"


def test_cache_replaces_the_index_when_the_sandbox_has_egress(tmp_path: Path) -> None:
    host_tree(tmp_path)
    config = read_host_config(tmp_path, env={}, home=HOME)
    url = "http://pypi.cache.cellbox/simple/"
    trust = sandbox_trust(config, 3128, cache_index_url=url)
    assert trust.env["PIP_INDEX_URL"] == url
    assert trust.env["PIP_TRUSTED_HOST"] == "mirror.example pypi.cache.cellbox"
    assert trust.env["PIP_EXTRA_INDEX_URL"] == "file:///opt/pypi/simple"  # local indexes stay
    offline = sandbox_trust(config, None, cache_index_url=url)
    assert offline.env["PIP_INDEX_URL"] == "https://mirror.example/simple"


def test_npm_cache_replaces_the_registry_when_the_sandbox_has_egress(tmp_path: Path) -> None:
    host_tree(tmp_path)
    config = read_host_config(tmp_path, env={"npm_config_registry": "https://npm.example/"}, home=HOME)
    url = "http://npm.cache.cellbox/"
    trust = sandbox_trust(config, 3128, npm_cache_url=url)
    assert trust.env["npm_config_registry"] == url
    assert trust.env["npm_config_audit"] == "false"  # the cache does not serve npm's audit
    assert trust.env["npm_config_proxy"] == "http://127.0.0.1:3128"
    offline = sandbox_trust(config, None, npm_cache_url=url)
    assert offline.env["npm_config_registry"] == "https://npm.example/"
    assert "npm_config_audit" not in offline.env


def test_apt_repositories_are_read_from_both_source_formats(tmp_path: Path) -> None:
    host_tree(tmp_path)
    assert read_host_config(tmp_path, env={}, home=HOME).apt.uris == (
        "http://deb.mirror.example/debian",
        "http://old.example/",
    )
