"""aws_call_sites reads AWS call sites out of source it never runs: each call form it knows, on a small package written
for the purpose, and each thing it cannot read reported as a problem with its file and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

from aws_call_sites import NOT_CLIENTS, CallSites, find_call_sites

import amiforge

SERVICES = frozenset({"ec2", "ssm", "autoscaling"})
SRC = Path(amiforge.__file__).resolve().parent


def read(tmp_path: Path, modules: dict[str, str]) -> CallSites:
    package = tmp_path / "pkg"
    for name, text in modules.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return find_call_sites(package, services=SERVICES)


def found(sites: CallSites) -> set[tuple[str, int, str]]:
    return {(s.path, s.line, s.action) for s in sites.sites}


def test_call_and_paginate_with_a_literal_operation(tmp_path: Path) -> None:
    sites = read(
        tmp_path,
        {
            "images.py": """\
            from amiforge.awsapi.clients import call, paginate

            def copy(session, image):
                ec2 = session.client("ec2", "eu-west-1")
                call(ec2, "CopyImage", image, SourceImageId=image)
                return list(paginate(ec2, "DescribeImages", "Images", image))

            def read(client):
                return call(client, operation="GetParameter", resource="/p", Name="/p")
            """
        },
    )
    assert not sites.problems
    assert found(sites) == {
        ("pkg/images.py", 5, "ec2:CopyImage"),
        ("pkg/images.py", 6, "ec2:DescribeImages"),
        ("pkg/images.py", 9, "ssm:GetParameter"),  # the one service of those used that has it
    }


def test_wrappers_to_any_depth_functions_by_module_methods_by_name(tmp_path: Path) -> None:
    sites = read(
        tmp_path,
        {
            "fleet.py": """\
            from amiforge.awsapi.clients import call, paginate

            class Fleet:
                def asg_call(self, operation, **kwargs):
                    return call(self.session.client("autoscaling"), operation, "group", **kwargs)

                def grow(self):
                    return self.asg_call("UpdateAutoScalingGroup", DesiredCapacity=2)

            def _listed(ec2, operation, key):
                return list(paginate(ec2, operation, key, "tagged"))

            def _tagged(ec2, what):
                return _listed(ec2, what, "Items")

            def plan(ec2):
                return _tagged(ec2, "DescribeVolumes"), _listed(ec2, operation="DescribeSnapshots", key="Snapshots")
            """,
            "refresh.py": """\
            def start(fleet):
                return fleet.asg_call("StartInstanceRefresh")
            """,
            "cli.py": """\
            def _listed(name, what, key):
                return name

            def report():
                return _listed("anything", "NotAnOperation", "k")
            """,
        },
    )
    assert not sites.problems
    assert found(sites) == {
        ("pkg/fleet.py", 8, "autoscaling:UpdateAutoScalingGroup"),
        ("pkg/fleet.py", 17, "ec2:DescribeVolumes"),  # through _tagged, then _listed
        ("pkg/fleet.py", 17, "ec2:DescribeSnapshots"),
        ("pkg/refresh.py", 2, "autoscaling:StartInstanceRefresh"),  # a module that imports nothing of AWS
    }  # cli.py's _listed is another function: not a call form


def test_methods_of_clients_waiters_and_paginators(tmp_path: Path) -> None:
    sites = read(
        tmp_path,
        {
            "machine.py": """\
            from amiforge.awsapi.clients import AwsSession

            class Machine:
                def send(self):
                    ssm = self.session.client("ssm", "eu-west-1")

                    def attempt():
                        return ssm.send_command(InstanceIds=["i-1"])

                    return attempt()

                def poll(self, ssm, command):
                    return ssm.get_command_invocation(CommandId=command)

                def wait(self, session, key):
                    session.client("ec2").get_waiter("image_available").wait(ImageIds=["ami-1"])
                    session.client("ec2").get_paginator("describe_snapshots")
                    return key.verify(b"sig", b"data")  # not a client: kms:Verify is not called
            """
        },
    )
    assert not sites.problems
    assert found(sites) == {
        ("pkg/machine.py", 8, "ssm:SendCommand"),
        ("pkg/machine.py", 13, "ssm:GetCommandInvocation"),
        ("pkg/machine.py", 16, "ec2:DescribeImages"),  # what the image_available waiter polls
        ("pkg/machine.py", 17, "ec2:DescribeSnapshots"),
    }


def test_what_cannot_be_read_is_a_problem_with_its_place(tmp_path: Path) -> None:
    sites = read(
        tmp_path,
        {
            "odd.py": """\
            from amiforge.awsapi.clients import call

            OPERATIONS = ["DescribeImages"]

            def each(ec2):
                for name in OPERATIONS:
                    call(ec2, name, "x")

            def tags(client):
                return call(client, "DescribeTags", "x")

            def typo(ec2):
                return call(ec2, "DescribeImage", "x")
            """
        },
    )
    assert sites.sites == []
    problems = {p.split(": ", 1)[0]: p for p in sites.problems}
    assert set(problems) == {"pkg/odd.py:7", "pkg/odd.py:10", "pkg/odd.py:13"}
    assert "neither a string literal nor a parameter" in problems["pkg/odd.py:7"]
    assert "'DescribeTags' this is (autoscaling or ec2)" in problems["pkg/odd.py:10"]
    assert "ec2 has no operation 'DescribeImage'" in problems["pkg/odd.py:13"]


def test_client_methods_on_receivers_the_pass_cannot_place_are_problems(tmp_path: Path) -> None:
    """A call named like a client method whose receiver is not known to be a client of a service, and getattr with
    such a name, would be AWS calls the sync test never sees: each is a problem with its place."""
    sites = read(
        tmp_path,
        {
            "hidden.py": """\
            from amiforge.awsapi.clients import AwsSession

            class Cleaner:
                def __init__(self, session):
                    self._ec2 = session.client("ec2")

                def purge(self, image):
                    self._ec2.deregister_image(ImageId=image)

            def drop(client, snapshot):
                client.delete_snapshot(SnapshotId=snapshot)

            def stop(ec2, instance):
                getattr(ec2, "terminate_instances")(InstanceIds=[instance])

            def pages(client):
                return client.get_paginator("describe_images")

            def fine(ec2, machine):
                machine.run(["true"])  # no client method is called run
                return ec2.describe_images(Owners=["self"])
            """,
            "local.py": """\
            def check(key):
                return key.delete_snapshot()  # a module that reaches no AWS: not read
            """,
        },
    )
    problems = {p.split(": ", 1)[0]: p for p in sites.problems}
    assert set(problems) == {"pkg/hidden.py:8", "pkg/hidden.py:11", "pkg/hidden.py:14", "pkg/hidden.py:17"}
    assert "self._ec2.deregister_image(…) looks like an AWS call" in problems["pkg/hidden.py:8"]
    assert "client.delete_snapshot(…) looks like an AWS call" in problems["pkg/hidden.py:11"]
    assert "call(client, 'TerminateInstances', …)" in problems["pkg/hidden.py:14"]
    assert "client.get_paginator(…)" in problems["pkg/hidden.py:17"]
    assert found(sites) == {("pkg/hidden.py", 21, "ec2:DescribeImages")}


def test_calls_that_only_share_a_client_method_name_are_listed_with_why(tmp_path: Path) -> None:
    """NOT_CLIENTS: each entry names its module and the called expression, and says why it is not an AWS call; the
    real source needs every entry (a stale one would hide a future call of that name)."""
    assert all(why.strip() for why in NOT_CLIENTS.values())
    real = find_call_sites(SRC)
    assert not real.problems
    for path, called in NOT_CLIENTS:
        text = (SRC.parent / path).read_text()
        assert f"{called}(" in text, f"NOT_CLIENTS lists {called} in {path}, which no longer calls it: drop the entry"


def test_wrappers_are_reported_as_call_forms(tmp_path: Path) -> None:
    """The call recorder looks through the wrappers the pass found to the call site, as the pass does."""
    sites = read(
        tmp_path,
        {
            "gc.py": """\
            from amiforge.awsapi.clients import paginate

            def _listed(ec2, operation):
                return list(paginate(ec2, operation, "Items", "x"))

            def plan(ec2):
                return _listed(ec2, "DescribeVolumes")
            """
        },
    )
    assert sites.call_forms == {("pkg/gc.py", "_listed")}
    assert [s.site for s in sites.sites] == ["pkg/gc.py:7"]
