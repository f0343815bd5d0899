"""The operator commands' usual mistakes: one line naming the file and what to do, an exit code."""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest

from gateway.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[gateway]\nid = "gw1"\nstate_dir = "{tmp_path / "state"}"\n')
    return path


def test_keygen_refuses_to_overwrite_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(capsys, "keygen", "--out", str(tmp_path), "--name", "gw1")[0] == 0
    before = (tmp_path / "checkpoint.key").read_bytes()
    code, err = _run(capsys, "keygen", "--out", str(tmp_path), "--name", "gw1")
    assert code == 2
    assert err.count("\n") == 0 and "checkpoint.key exists" in err and "--force" in err
    assert (tmp_path / "checkpoint.key").read_bytes() == before


def test_keygen_export_public_without_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(capsys, "keygen", "--out", str(tmp_path), "--export-public", "k.pub")
    assert code == 2
    assert err.count("\n") == 0 and f"{tmp_path / 'checkpoint.key'}" in err
    assert not (tmp_path / "k.pub").exists()


def test_reload_without_a_running_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(capsys, "reload", "--config", str(_config(tmp_path)))
    assert code == 1
    assert err.count("\n") == 0
    assert "gateway.pid" in err and "no running gateway" in err and "gateway run" in err


def test_status_with_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err = _run(capsys, "status", "--url", f"http://127.0.0.1:{port}", "--timeout", "2")
    assert code == 3
    assert err.count("\n") == 0 and f"127.0.0.1:{port}" in err and "unreachable" in err


def test_archive_export_of_a_missing_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "out.csv"
    code, err = _run(capsys, "archive", "export", "--db", str(tmp_path / "a.db"), "--csv", str(csv))
    assert code == 2
    assert err.count("\n") == 0 and "a.db: no such archive" in err
    assert not csv.exists(), "a failed export leaves no empty CSV behind"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--public-key", "{tmp}/nope.pub", "--capture", "{tmp}/c.jsonl"], "nope.pub: cannot read"),
        (["--capture", "{tmp}/nope.jsonl"], "nope.jsonl: cannot read"),
        (["--archive", "{tmp}/nope.db"], "nope.db: no such archive"),
    ],
    ids=["public-key", "capture", "archive"],
)
def test_verify_with_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], named: str
) -> None:
    (tmp_path / "c.jsonl").write_text("")
    code, err = _run(capsys, "verify", *(a.format(tmp=tmp_path) for a in args))
    assert code == 2, "a missing input is a usage error, not a failed verification (1)"
    assert err.count("\n") == 0 and named in err


class _NotAGateway(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>some other service</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_status_of_something_that_is_not_a_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotAGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, err = _run(capsys, "status", "--url", url, "--timeout", "5")
    finally:
        server.shutdown()
        server.server_close()
    assert code == 3
    assert err.count("\n") == 0 and "not a gateway health endpoint" in err


def test_status_usage_errors_are_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "status", "--url", "ftp://127.0.0.1:9108")
    assert code == 2 and "http:// URL" in err
    config = _config(tmp_path)
    config.write_text(config.read_text() + "[health]\nenabled = false\n")
    code, err = _run(capsys, "status", "--config", str(config))
    assert code == 2 and "enabled = false" in err and str(config) in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["verify"], "needs --seconds"),
        (["archive", "--db", "{tmp}/a.db", "--csv", "{tmp}/a.csv"], "--csv goes with"),
    ],
    ids=["verify-without-a-source", "archive-csv-without-export"],
)
def test_usage_mistakes_are_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    code, err = _run(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert code == 2 and err.count("\n") == 0 and says in err
    assert not list(tmp_path.iterdir()), "nothing was created"
