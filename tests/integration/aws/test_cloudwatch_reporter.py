"""The CloudWatch reporter baked into EC2 images (providers/guest_files/cloudwatch), run for real: this machine's sh and
curl (--aws-sigv4) against moto's HTTP server, the instance's metadata served by a small IMDSv2 stand-in (moto's
own has no tags and no per-instance identity). What the readiness script sends lands as CloudWatch datapoints with
the dimensions amiforge and dashboards read, and the fleet reads each member's heartbeat back with GetMetricData.

The stand-in serves what the EC2 docs describe (instance-metadata-v2-how-it-works, instance-metadata-security-
credentials, work-with-tags-in-IMDS): a session token from PUT /latest/api/token, required on every GET (401
without), and 404 for a tag the launch template does not publish."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import boto3
import pytest
from moto.server import ThreadedMotoServer

from amiforge.providers import guest as in_guest
from amiforge.providers.interface import Release
from tests.conftest import required_or_skip

REGION = "eu-west-1"
TOKEN = "TEST-IMDS-TOKEN-0001"


class Imds:
    """Instance metadata for one instance: its id and image, the region, a role's credentials, and optionally the
    group tag (published only when the launch template enables tags in metadata)."""

    def __init__(self, instance: str, image: str, *, role: str | None = "amiforge-instance",
                 group_tag: str | None = None) -> None:  # fmt: skip
        self.paths = {"instance-id": instance, "ami-id": image, "placement/region": REGION}
        if role is not None:
            self.paths["iam/security-credentials/"] = role
            self.paths[f"iam/security-credentials/{role}"] = json.dumps(
                {
                    "Code": "Success",
                    "Type": "AWS-HMAC",
                    "AccessKeyId": "TESTKEY0000000000001",
                    "SecretAccessKey": "TEST/secret+0001",
                    "Token": "TEST-session-token/0001==",
                    "Expiration": "2099-01-01T00:00:00Z",
                },
                indent=2,
            )  # fmt: skip  (pretty-printed, as EC2 serves it)
        if group_tag is not None:
            self.paths["tags/instance/aws:autoscaling:groupName"] = group_tag
        self.unauthorised = 0

    def handler(self) -> type[BaseHTTPRequestHandler]:
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                self._send(200, TOKEN) if ok else self._send(400)

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    imds.unauthorised += 1
                    self._send(401)
                    return
                value = imds.paths.get(self.path.removeprefix("/latest/meta-data/"))
                self._send(200, value) if value is not None else self._send(404)

        return Handler


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _client(service: str, url: str) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=url, aws_access_key_id="TESTKEY0000000000001",
                        aws_secret_access_key="TEST/secret+0001")  # fmt: skip


def _serve(imds: Imds) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), imds.handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _group(url: str, name: str) -> tuple[str, str]:
    """An Auto Scaling group in moto with one instance: (its instance id, its image id)."""
    ec2, autoscaling = _client("ec2", url), _client("autoscaling", url)
    image = ec2.register_image(Name=f"TEST-{name}", Architecture="x86_64", RootDeviceName="/dev/xvda")["ImageId"]
    ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={"ImageId": image,
                                                                              "InstanceType": "t3.micro"})  # fmt: skip
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": name}, MinSize=1, MaxSize=1,
        AvailabilityZones=[f"{REGION}a"],
    )  # fmt: skip
    [member] = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0][
        "Instances"
    ]
    return str(member["InstanceId"]), image


def _run_ready(tmp_path: Path, imds_url: str, moto: str, *args: str) -> str:
    """The readiness script (`args`: heartbeat …) with the reporter installed, as on an EC2 image; the console."""
    required_or_skip(shutil.which("curl") is not None, "curl is missing", "apt-get install curl")
    guest = tmp_path / "guest"
    guest.mkdir(exist_ok=True)
    for name in ("ready", "cloudwatch"):
        (guest / name).write_bytes(in_guest.guest_file(name))
        (guest / name).chmod(0o755)
    release = guest / "release"
    release.write_bytes(in_guest.release_file(Release("web", "web@7", "ab" * 32, datetime.now(UTC))))
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for stub in ("modprobe", "systemctl"):  # this machine's own must not answer for a guest
        (stubs / stub).write_text("#!/bin/sh\nexit 1\n")
        (stubs / stub).chmod(0o755)
    env = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "AMIFORGE_CONSOLE": str(tmp_path / "console"),
        "AMIFORGE_READY_FILE": str(tmp_path / "ready-record"),
        "AMIFORGE_HEARTBEAT_EVERY": "0",
        "AMIFORGE_HEARTBEAT_TIMES": "2",
        "AMIFORGE_CLOUDWATCH": str(guest / "cloudwatch"),
        "AMIFORGE_IMDS": imds_url,
        "AMIFORGE_AWS_ENDPOINT": f"{moto}/",
        "AMIFORGE_RELEASE": str(release),
        "AMIFORGE_GROUP_FILE": str(tmp_path / "group"),
    }
    subprocess.run([str(guest / "ready"), *args], env=env, check=True, timeout=60, capture_output=True)
    return (tmp_path / "console").read_text()


def _datapoints(url: str, metric: str, dimensions: dict[str, str], stat: str) -> list[float]:
    end = datetime.now(UTC) + timedelta(minutes=1)
    answer = _client("cloudwatch", url).get_metric_data(
        MetricDataQueries=[{"Id": "m", "MetricStat": {
            "Metric": {"Namespace": "amiforge", "MetricName": metric,
                       "Dimensions": [{"Name": k, "Value": v} for k, v in dimensions.items()]},
            "Period": 3600, "Stat": stat}}],
        StartTime=end - timedelta(hours=1), EndTime=end,
    )  # fmt: skip
    return [float(v) for v in answer["MetricDataResults"][0]["Values"]]


def test_readiness_and_heartbeats_land_in_cloudwatch_with_the_group_from_the_api(tmp_path: Path, moto_url: str) -> None:
    instance, image = _group(moto_url, "web-asg")
    imds = Imds(instance, image)  # tags not published in metadata: the group comes from DescribeAutoScalingInstances
    server, imds_url = _serve(imds)
    try:
        console = _run_ready(tmp_path, imds_url, moto_url)
        console += _run_ready(tmp_path, imds_url, moto_url, "heartbeat")
    finally:
        server.shutdown()
    assert "AMIFORGE-CLOUDWATCH" not in console, console  # nothing failed
    assert imds.unauthorised == 0  # every metadata read carried the session token
    assert (tmp_path / "group").read_text() == "web-asg\n"  # asked once a boot, then kept
    by_group = {"ImageId": image, "Version": "web@7", "AutoScalingGroupName": "web-asg"}
    assert _datapoints(moto_url, "Heartbeat", by_group, "SampleCount") == [2.0]
    assert _datapoints(moto_url, "Heartbeat", {"InstanceId": instance}, "SampleCount") == [2.0]
    [uptime] = _datapoints(moto_url, "Ready", {"InstanceId": instance}, "Maximum")
    ready = in_guest.READY_RE.search(console)
    assert ready is not None and uptime == pytest.approx(float(ready.group(1)))


def test_the_group_tag_in_metadata_is_used_when_the_template_publishes_it(tmp_path: Path, moto_url: str) -> None:
    imds = Imds("i-0000000000test02", "ami-0000000000test02", group_tag="tagged-asg")  # no such instance in moto
    server, imds_url = _serve(imds)
    try:
        console = _run_ready(tmp_path, imds_url, moto_url, "heartbeat")
    finally:
        server.shutdown()
    assert "AMIFORGE-CLOUDWATCH" not in console, console
    by_group = {"ImageId": "ami-0000000000test02", "Version": "web@7", "AutoScalingGroupName": "tagged-asg"}
    assert _datapoints(moto_url, "Heartbeat", by_group, "SampleCount") == [2.0]


def test_without_a_role_it_says_so_on_the_console_and_the_heartbeat_goes_on(tmp_path: Path, moto_url: str) -> None:
    imds = Imds("i-0000000000test03", "ami-0000000000test03", role=None)
    server, imds_url = _serve(imds)
    try:
        console = _run_ready(tmp_path, imds_url, moto_url, "heartbeat")
    finally:
        server.shutdown()
    said = [line for line in console.splitlines() if line.startswith("AMIFORGE-CLOUDWATCH")]
    assert said == ["AMIFORGE-CLOUDWATCH Heartbeat not reported: the instance has no role (attach an instance "
                    "profile)"] * 2  # fmt: skip
    assert console.count("AMIFORGE-HEARTBEAT ") == 2  # the console's heartbeat does not depend on CloudWatch
    assert _datapoints(moto_url, "Heartbeat", {"InstanceId": "i-0000000000test03"}, "SampleCount") == []


def test_metadata_that_never_answers_holds_up_neither_the_checks_nor_readiness(tmp_path: Path, moto_url: str) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers: curl's own timeout (2 s) ends each call
    try:
        console = _run_ready(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}", moto_url)
    finally:
        silent.close()
    lines = console.splitlines()
    said = lines.index("AMIFORGE-CLOUDWATCH Ready not reported: no instance metadata token (IMDSv2)")
    assert lines.index(in_guest.DONE_MARK) < said  # the checks ran while the report was still waiting


class Captured(BaseHTTPRequestHandler):
    """An endpoint that keeps each request and answers as PutMetricData does (moto's server does not check
    signatures, so this one keeps what was signed for the test to check)."""

    requests: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Captured.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
        answer = (
            b'<PutMetricDataResponse xmlns="http://monitoring.amazonaws.com/doc/2010-08-01/"><ResponseMetadata>'
            b"<RequestId>TEST-0001</RequestId></ResponseMetadata></PutMetricDataResponse>"
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def test_the_signature_is_the_one_botocore_computes_for_the_same_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SigV4 as AWS documents it, by botocore's implementation: same credentials, time, headers and body, same
    signature; and the session token is among the signed headers."""
    import botocore.auth
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    Captured.requests = []
    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), Captured)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{endpoint.server_address[1]}"
    imds = Imds("i-0000000000test04", "ami-0000000000test04", group_tag="web-asg")
    server, imds_url = _serve(imds)
    try:
        console = _run_ready(tmp_path, imds_url, url, "heartbeat")
    finally:
        server.shutdown()
        endpoint.shutdown()
    assert "AMIFORGE-CLOUDWATCH" not in console, console
    assert len(Captured.requests) == 2  # one PutMetricData a beat
    headers, body = Captured.requests[0]
    algorithm, _, fields = headers["authorization"].partition(" ")
    parts = dict(field.strip().split("=", 1) for field in fields.split(","))
    assert algorithm == "AWS4-HMAC-SHA256"
    assert parts["Credential"].endswith(f"/{REGION}/monitoring/aws4_request")
    signed = parts["SignedHeaders"].split(";")
    assert "x-amz-security-token" in signed and headers["x-amz-security-token"] == "TEST-session-token/0001=="
    kept = {h: headers[h] for h in signed if h not in ("host", "x-amz-date", "x-amz-security-token")}
    request = AWSRequest(method="POST", url=f"{url}/", data=body, headers=kept)
    signed_at = datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ")  # botocore signs at "now": curl's now
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: signed_at)
    SigV4Auth(Credentials("TESTKEY0000000000001", "TEST/secret+0001", "TEST-session-token/0001=="), "monitoring",
              REGION).add_auth(request)  # fmt: skip
    expected = dict(f.strip().split("=", 1) for f in str(request.headers["Authorization"]).split(" ", 1)[1].split(","))
    assert (expected["SignedHeaders"], expected["Signature"]) == (parts["SignedHeaders"], parts["Signature"])
    form = dict(pair.split("=", 1) for pair in body.decode().split("&"))
    assert form["Action"] == "PutMetricData" and form["Namespace"] == "amiforge"
    assert form["MetricData.member.2.Dimensions.member.1.Value"] == "i-0000000000test04"
