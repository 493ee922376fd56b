"""The closed door's pieces without a federation: client certificates, certificate requests, the proxy's
config, enrolment and revocation files, submission tokens."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmed.config import load_server_config, load_site_config
from fedmed.deploy import enrollment, pki, proxy, site_certs
from fedmed.deploy.workspace import listen_address, provision
from fedmed.flower.records import encode_run
from fedmed.flower.runtime.client_tls import CERTIFICATE_OPTION, KEY_OPTION, take_options
from fedmed.flower.wire import RUN_DIR_KEY, SUBMISSION_KEY
from fedmed.runs import submissions

DIGEST = "ab" * 32


def _provision(root: Path, *, site_keys: bool = True, addresses: list[str] | None = None):
    return provision(
        root,
        federation="hospitals",
        addresses=addresses or ["127.0.0.1", "localhost"],
        port=8443,
        sites=["a", "b"],
        site_keys=site_keys,
        app_digest=DIGEST,
    )


@pytest.fixture
def workspace(tmp_path: Path):
    return _provision(tmp_path / "fed")


def test_provisioning_issues_each_site_an_enrolled_client_certificate(workspace) -> None:
    site = load_site_config(workspace.kit("a") / "site.toml")
    certificate = site_certs.check_client_certificate(
        certificate_path=site.client_certificate,
        key_path=site.client_key,
        ca_certificate_path=site.server.ca_certificate,
    )
    assert certificate.subject.rfc4514_string() == "CN=a"
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert os.stat(site.client_key).st_mode & 0o777 == 0o600
    server = load_server_config(workspace.server_config)
    assert sorted(p.name for p in server.site_certificates.iterdir()) == ["a.crt", "b.crt"]
    assert proxy.enrolled_sites(server)["a"] == site_certs.fingerprint(certificate)
    # No private key of a site is in the coordinator's folder.
    assert not [p for p in workspace.server_dir.rglob("*") if p.name.endswith("-tls.key")]


def test_fingerprint_is_what_openssl_and_nginx_print(workspace) -> None:
    path = workspace.site_certificates / "a.crt"
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha1", "-in", str(path)], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip("openssl command line not available")
    expected = out.stdout.split("=", 1)[1].strip().replace(":", "").lower()
    assert site_certs.fingerprint(pki.load_certificate(path)) == expected


def test_listen_address_follows_the_addresses_given() -> None:
    assert listen_address(["127.0.0.1", "localhost"]) == "127.0.0.1"
    assert listen_address(["fed.example.org", "127.0.0.1"]) == "0.0.0.0"


def test_a_certificate_request_is_signed_and_the_key_never_leaves_the_site(tmp_path: Path) -> None:
    workspace = _provision(tmp_path / "fed", site_keys=False)
    keys = tmp_path / "site-c" / "keys"
    pki.create_node_key_pair(keys / "c.key", keys / "c.pub")
    request = site_certs.create_request(keys, "c")
    assert os.stat(site_certs.client_key_path(keys, "c")).st_mode & 0o777 == 0o600
    assert b"PRIVATE" not in request.read_bytes()
    server = load_server_config(workspace.server_config)
    signed = enrollment.add_site(server, site="c", public_key=keys / "c.pub", csr=request)
    assert signed == keys / "c.crt"
    site_certs.check_client_certificate(
        certificate_path=signed,
        key_path=site_certs.client_key_path(keys, "c"),
        ca_certificate_path=workspace.ca_certificate,
    )
    assert "c" in proxy.enrolled_sites(server) and (server.site_keys / "c.pub").exists()
    assert site_certs.fingerprint(pki.load_certificate(signed)) in proxy.enrolled_file(server).read_text()


def test_a_request_for_another_site_or_without_the_ca_key_is_refused(tmp_path: Path) -> None:
    workspace = _provision(tmp_path / "fed", site_keys=False)
    keys = tmp_path / "keys"
    pki.create_node_key_pair(keys / "c.key", keys / "c.pub")
    request = site_certs.create_request(keys, "c")
    server = load_server_config(workspace.server_config)
    with pytest.raises(pki.CertificateError, match="not site 'd'"):
        enrollment.add_site(server, site="d", public_key=keys / "c.pub", csr=request)
    shutil.move(workspace.ca_key, tmp_path / "offline.key")
    with pytest.raises(pki.CertificateError, match=r"set 'ca_key' in server\.toml"):
        enrollment.add_site(server, site="c", public_key=keys / "c.pub", csr=request)


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path, workspace) -> None:
    other = _provision(tmp_path / "other")
    foreign = other.kit("a") / "keys"
    with pytest.raises(pki.CertificateError, match="not signed by this federation's CA"):
        site_certs.check_client_certificate(
            certificate_path=foreign / "a.crt",
            key_path=foreign / "a-tls.key",
            ca_certificate_path=workspace.ca_certificate,
        )
    server = load_server_config(workspace.server_config)
    shutil.copyfile(foreign / "a.crt", server.site_certificates / "x.crt")
    with pytest.raises(pki.CertificateError, match="not signed by this federation's CA"):
        proxy.render_enrolled(server)


def test_a_certificate_file_whose_name_is_not_a_site_name_is_refused(workspace) -> None:
    # The name goes into nginx's config: a quote in it would end the site's name and write config of its own.
    server = load_server_config(workspace.server_config)
    before = proxy.enrolled_file(server).read_text() if proxy.enrolled_file(server).exists() else None
    shutil.copyfile(server.site_certificates / "a.crt", server.site_certificates / 'a"; default 1;.crt')
    with pytest.raises(proxy.ProxyError, match="is not a site name"):
        proxy.render_enrolled(server)
    after = proxy.enrolled_file(server).read_text() if proxy.enrolled_file(server).exists() else None
    assert after == before


def test_a_client_key_that_does_not_match_or_is_readable_is_refused(workspace) -> None:
    kit = workspace.kit("a") / "keys"
    with pytest.raises(pki.CertificateError, match="does not belong to"):
        site_certs.check_client_certificate(
            certificate_path=kit / "a.crt",
            key_path=workspace.kit("b") / "keys" / "b-tls.key",
            ca_certificate_path=workspace.ca_certificate,
        )
    os.chmod(kit / "a-tls.key", 0o644)
    with pytest.raises(pki.CertificateError, match="chmod 600"):
        site_certs.check_client_certificate(
            certificate_path=kit / "a.crt", key_path=kit / "a-tls.key", ca_certificate_path=workspace.ca_certificate
        )


def test_the_proxy_config_admits_only_the_fleet_api_for_enrolled_certificates(workspace) -> None:
    server = load_server_config(workspace.server_config)
    text = proxy.render_config(server).read_text()
    assert f"listen 127.0.0.1:{server.superlink.port} ssl;" in text
    assert "ssl_verify_client on;" in text and f"ssl_client_certificate {server.tls.ca_certificate};" in text
    assert f"server 127.0.0.1:{server.superlink.internal_port};" in text and server.superlink.internal_port == 8444
    assert "proxy_ssl_verify on;" in text and "keepalive 32;" in text and "proxy_http_version 1.1;" in text
    assert "limit_except POST" in text and "/v1/control" not in text
    assert "register-node" not in text.replace("unregister-node", "")  # neither register nor unregister
    assert "unregister-node" not in text
    enrolled = proxy.enrolled_file(server).read_text()
    for site, fingerprint in proxy.enrolled_sites(server).items():
        assert f'{fingerprint} "{site}";' in enrolled  # the certificate's site: the access log names it
    assert sum(line.endswith('";') for line in enrolled.splitlines()) == 2
    assert 'if ($fedmed_site = "") {' in text and 'default "";' in text
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        if os.environ.get("FEDMED_REQUIRE_NGINX") == "1":
            pytest.fail("nginx not installed (FEDMED_REQUIRE_NGINX=1 makes this a failure, not a skip)")
        pytest.skip("nginx not installed")
    checked = subprocess.run(
        [nginx, "-t", "-e", "stderr", "-p", f"{proxy.proxy_dir(server)}/", "-c", str(proxy.config_file(server))],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr


def test_remove_site_revokes_its_key_and_certificate(workspace) -> None:
    server = load_server_config(workspace.server_config)
    fingerprint = proxy.enrolled_sites(server)["a"]
    proxy.render_config(server)
    lines = enrollment.remove_site(server, site="a")
    assert not (server.site_keys / "a.pub").exists() and not (server.site_certificates / "a.crt").exists()
    assert fingerprint not in proxy.enrolled_file(server).read_text()
    assert "refuses it when it starts" in lines[0]
    with pytest.raises(enrollment.EnrollmentError, match="not enrolled"):
        enrollment.remove_site(server, site="a")
    # Added back with its kit's certificate (already issued by this CA).
    kit = workspace.kit("a") / "keys"
    enrollment.add_site(server, site="a", public_key=kit / "a.pub", certificate=kit / "a.crt")
    assert proxy.enrolled_sites(server)["a"] == fingerprint


def test_server_start_without_nginx_says_how_to_install_it(workspace, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(proxy, "NGINX_LOCATIONS", ())
    with pytest.raises(proxy.ProxyError, match="apt install nginx"):
        proxy.command(load_server_config(workspace.server_config))


def test_the_supernode_wrapper_takes_its_own_options_out() -> None:
    argv = ["--superlink", "h:1", "--root-certificates", "ca.crt", CERTIFICATE_OPTION, "c.crt", KEY_OPTION, "c.key"]
    rest, found = take_options(argv)
    assert rest == ["--superlink", "h:1", "--root-certificates", "ca.crt"]
    assert found == {"--root-certificates": "ca.crt", CERTIFICATE_OPTION: "c.crt", KEY_OPTION: "c.key"}


def test_a_submission_token_is_used_once_and_only_for_a_run_under_runs(tmp_path: Path) -> None:
    state, runs = tmp_path / "state", tmp_path / "runs"
    run_dir = runs / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text("")
    token = submissions.issue(state, run_dir)
    assert os.stat(state / "submissions" / f"{token}.json").st_mode & 0o077 == 0
    assert submissions.claim(state, token, runs_root=runs) == run_dir.resolve()
    with pytest.raises(submissions.SubmissionError, match="was used already"):
        submissions.claim(state, token, runs_root=runs)
    with pytest.raises(submissions.SubmissionError, match="unknown"):
        submissions.claim(state, "A" * 43, runs_root=runs)
    for forged in ("../../etc/passwd", "", "x"):
        with pytest.raises(submissions.SubmissionError, match="no valid submission token"):
            submissions.claim(state, forged, runs_root=runs)
    outside = submissions.issue(state, tmp_path)
    with pytest.raises(submissions.SubmissionError, match="is not a run directory under"):
        submissions.claim(state, outside, runs_root=runs)


def test_a_deployed_run_config_carries_a_token_and_no_directory(tmp_path: Path) -> None:
    from fedmed.config import run_config_from_dict

    config = run_config_from_dict({"name": "x", "task": {"kind": "segmentation"}}, base=tmp_path)
    deployed = encode_run(config, run_id="x", submission="t" * 43)
    assert RUN_DIR_KEY not in deployed and deployed[SUBMISSION_KEY] == "t" * 43
    simulated = encode_run(config, run_id="x", run_dir=tmp_path)
    assert simulated[RUN_DIR_KEY] == str(tmp_path) and SUBMISSION_KEY not in simulated
