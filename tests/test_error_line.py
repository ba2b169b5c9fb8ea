"""A failure after the edge process started is one line of stderr: no gRPC log line beside it (TLS refused)."""
import subprocess
import sys

from tests.conftest import ROOT


def test_a_tls_failure_is_one_line(tiny_with_tokenizer, tmp_path):
    from tests.test_grpc import Server, make_certs

    folder, _ = tiny_with_tokenizer
    certs = make_certs(tmp_path / "certs")
    server = Server(folder, tmp_path / "server.log", ((1,), (3,)), "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]))
    server.start().wait_ready()
    try:
        process = subprocess.run(
            [sys.executable, "main_3_split.py", "--base-model", str(folder), "--first", "1", "--second", "3", "--max-new-tokens", "4",
             "--cloud", server.url, "--tls-ca", str(certs["other_ca.pem"])],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
    finally:
        server.stop()
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 2 and process.stdout == ""
    assert lines[-1].startswith("main_3_split.py: error: cloud unreachable at 127.0.0.1:") and "not signed by --tls-ca" in lines[-1]
    assert len(lines) == 2 and lines[0].startswith("[triadic split"), lines  # the run's header, then the error alone
