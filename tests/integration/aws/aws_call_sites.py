"""Every AWS API call amiforge's source can make, found by reading the code (ast), never by running it.

`find_call_sites(src)` reads every module of the package at `src` and returns each AWS call site with its service and
operation. It knows these call forms:

- `call(client, "CopyImage", …)` and `paginate(client, "DescribeImages", …)` of amiforge.awsapi.clients, in every
  module that imports them, the operation a string literal (positionally or as `operation=`);
- wrappers of those, to any depth: a function that passes one of its own parameters on as the operation
  (fleet's `asg_call(self, operation, …)`, gc's `_listed(ec2, operation, …)`) is a call form too, and its callers'
  literals are the call sites. A module-level function is matched by the name it has in the calling module (its own
  or imported), a method by its attribute name (`fleet.asg_call("StartInstanceRefresh")`);
- in modules that reach AWS (they import boto3, botocore or amiforge.awsapi, or make a client), methods called on a
  boto3 client (`ssm.send_command(…)`), `get_paginator("describe_images")` and `get_waiter("image_available")` (the
  operation the waiter polls), where the receiver is a client: a name bound to `<session>.client("ssm", …)` in an
  enclosing function, a name that is a service's own name (`ec2`, `kms`: the code's convention for a client
  variable), or such a `.client(…)` call itself.

A call site's service is the client's when the code says it, else the one service (of those the code makes clients
for) that has the operation. Whatever the pass cannot read — an operation that is neither a literal nor a parameter
passed on, an operation no such service has, one that several have with no client to tell them apart — is a problem
naming file:line, so a new way of calling AWS fails the sync test instead of going unseen. So is, in a module that
reaches AWS, a method call named like a boto3 client method (botocore's `xform_name` of an operation of a service
the code makes clients for: `delete_snapshot`) on a receiver the pass cannot tell is a client of which service
(`self._ec2.deregister_image()`, `client.delete_snapshot()` where `client` was passed in), and `getattr(x, "<such a
name>")`: the call would go unseen. `NOT_CLIENTS` lists the few calls that share such a name and are not AWS calls,
each with why.

Each site is `path:line` (`CallSite.site`), the path relative to the directory holding the package, as the call
recorder (iam_runners.py) names the line that made a call; `CallSites.call_forms` are the wrappers' definitions,
which the recorder looks through to the call site, as this pass does.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import botocore.session
from botocore import xform_name
from botocore.exceptions import UnknownServiceError

from amiforge.awsapi.clients import iam_action

CLIENTS_MODULE = "amiforge.awsapi.clients"
# The call forms of awsapi.clients: function name → (index of the operation argument, its keyword name).
PRIMITIVES: dict[str, tuple[int, str]] = {"call": (1, "operation"), "paginate": (1, "operation")}
# Client methods that are not API operations themselves but name one.
_PAGINATOR, _WAITER = "get_paginator", "get_waiter"
# Calls named like a client method that are not AWS calls: (module path, the called expression) → why.
NOT_CLIENTS: dict[tuple[str, str], str] = {
    ("amiforge/signing/kms.py", "key.verify"): "cryptography's EllipticCurvePublicKey.verify: verification is local",
    ("amiforge/providers/aws/machine.py", "public.encrypt"): "cryptography's RSAPublicKey.encrypt: an SSM upload's "
    "data key, wrapped with the instance's upload key",
}

_LOADER = botocore.session.get_session()
Function = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda


@dataclass(frozen=True, order=True)
class CallSite:
    """One place in the source that calls one AWS API operation."""

    path: str  # relative to the directory holding the package: amiforge/providers/aws/bake.py
    line: int
    service: str  # botocore's service name
    operation: str  # as the service model names it: DescribeImages
    function: str = ""  # the function it is in ("" at module level)

    @property
    def action(self) -> str:
        return action_of(self.service, self.operation)

    @property
    def site(self) -> str:
        return f"{self.path}:{self.line}"

    def __str__(self) -> str:
        return self.site


@dataclass
class CallSites:
    sites: list[CallSite] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    call_forms: set[tuple[str, str]] = field(default_factory=set)  # (path, function name) of each wrapper

    def by_action(self) -> dict[str, list[CallSite]]:
        out: dict[str, list[CallSite]] = {}
        for site in sorted(self.sites):
            out.setdefault(site.action, []).append(site)
        return out


def action_of(service: str, operation: str) -> str:
    """The IAM action of `operation`, derived as amiforge derives it for its error messages (clients.iam_action)."""
    model = _LOADER.get_service_model(service)
    return iam_action(SimpleNamespace(meta=SimpleNamespace(service_model=model)), operation)


@dataclass(frozen=True)
class _Wrapper:
    """A function passing one of its parameters on as an operation: where its callers give it, and the service of
    the client it calls with (None: decided per call site)."""

    index: int  # among the arguments a caller passes (self/cls not counted)
    keyword: str
    service: str | None


@dataclass
class _Module:
    name: str  # amiforge.providers.aws.bake
    path: str  # amiforge/providers/aws/bake.py
    tree: ast.Module
    reaches_aws: bool
    imports: dict[str, tuple[str, str | None]]  # local name → (module, attribute) it stands for
    scopes: dict[ast.AST, tuple[Function, ...]] = field(default_factory=dict)  # node → enclosing functions
    methods: set[ast.AST] = field(default_factory=set)  # function definitions directly in a class body


def _client_service(node: ast.AST) -> str | None:
    """ "ec2" for `<anything>.client("ec2", …)`."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "client"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.args[0].value
    return None


def _load(src: Path, path: Path) -> _Module:
    tree = ast.parse(path.read_text(), filename=str(path))
    relative = path.relative_to(src.parent)
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    imports: dict[str, tuple[str, str | None]] = {}
    reaches = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imports[alias.asname or alias.name.split(".")[0]] = (alias.name, None)
                reaches |= alias.name.split(".")[0] in ("boto3", "botocore")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                imports[alias.asname or alias.name] = (node.module, alias.name)
            reaches |= node.module.split(".")[0] in ("boto3", "botocore") or node.module.startswith("amiforge.awsapi")
        reaches |= _client_service(node) is not None
    module = _Module(".".join(parts), relative.as_posix(), tree, reaches, imports)

    def visit(node: ast.AST, stack: tuple[Function, ...]) -> None:
        module.scopes[node] = stack
        if isinstance(node, ast.ClassDef):
            module.methods |= {n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        inner = (*stack, node) if isinstance(node, Function) else stack
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, ())
    return module


def _params(function: Function) -> list[str]:
    args = function.args
    return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]


def _argument(node: ast.Call, index: int, keyword: str) -> ast.expr | None:
    for kw in node.keywords:
        if kw.arg == keyword:
            return kw.value
    return node.args[index] if len(node.args) > index else None


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class _Reader:
    def __init__(self, src: Path, services: frozenset[str] | None) -> None:
        self.modules = [_load(src, path) for path in sorted(src.rglob("*.py"))]
        found = {s for m in self.modules if m.reaches_aws for n in ast.walk(m.tree) if (s := _client_service(n))}
        self.services = services if services is not None else frozenset(found)
        self.operations: dict[str, frozenset[str]] = {}
        for service in self.services:
            self._operations(service)
        # What a client's methods are called (delete_snapshot), for calls whose receiver the pass cannot place.
        self.client_methods = frozenset(xform_name(op) for service in self.services for op in self.operations[service])
        self.functions: dict[tuple[str, str], _Wrapper] = {}  # (module, name) → wrapper
        self.methods: dict[str, _Wrapper] = {}  # method name → wrapper
        self.result = CallSites()

    def _operations(self, service: str) -> frozenset[str] | None:
        if service not in self.operations:
            try:
                self.operations[service] = frozenset(_LOADER.get_service_model(service).operation_names)
            except UnknownServiceError:
                return None
        return self.operations[service]

    def _problem(self, module: _Module, node: ast.AST, text: str) -> None:
        problem = f"{module.path}:{getattr(node, 'lineno', '?')}: {text}"
        if problem not in self.result.problems:
            self.result.problems.append(problem)

    # --- what a client expression is -------------------------------------------------------------------------

    def _service_of(self, module: _Module, expr: ast.AST | None) -> str | None:
        if expr is None:
            return None
        direct = _client_service(expr)
        if direct is not None:
            return direct
        if not isinstance(expr, ast.Name):
            return None
        for function in reversed(module.scopes.get(expr, ())):
            for node in ast.walk(function):
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == expr.id for t in node.targets
                ):
                    bound = _client_service(node.value)
                    if bound is not None:
                        return bound
        return expr.id if expr.id in self.services else None

    def _service_for(self, module: _Module, node: ast.AST, operation: str, client_service: str | None) -> str | None:
        if client_service is not None:
            operations = self._operations(client_service)
            if operations is None or operation not in operations:
                self._problem(module, node, f"{client_service} has no operation {operation!r}")
                return None
            return client_service
        candidates = sorted(s for s in self.services if operation in self.operations[s])
        if len(candidates) == 1:
            return candidates[0]
        known = " or ".join(candidates) if candidates else "no service amiforge makes clients for has it"
        self._problem(
            module,
            node,
            f"cannot tell which service's {operation!r} this is ({known}): call it on a client made in the same "
            "function, or on a variable named after the service",
        )
        return None

    # --- call forms: the primitives and every wrapper of them -------------------------------------------------

    def _form(self, module: _Module, node: ast.Call) -> tuple[_Wrapper, bool] | None:
        """The call form `node` calls, if any, and whether it is a primitive (call/paginate) of awsapi.clients."""
        func = node.func
        if isinstance(func, ast.Name):
            origin = module.imports.get(func.id)
            target = (origin[0], origin[1]) if origin is not None and origin[1] is not None else (module.name, func.id)
            if target[0] == CLIENTS_MODULE and target[1] in PRIMITIVES:
                index, keyword = PRIMITIVES[target[1]]
                return _Wrapper(index, keyword, None), True
            wrapper = self.functions.get((target[0], str(target[1])))
            return (wrapper, False) if wrapper is not None else None
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Name) and func.value.id in module.imports:
                origin = module.imports[func.value.id]
                dotted = origin[0] if origin[1] is None else f"{origin[0]}.{origin[1]}"
                wrapper = self.functions.get((dotted, func.attr))
                return (wrapper, False) if wrapper is not None else None
            wrapper = self.methods.get(func.attr)
            return (wrapper, False) if wrapper is not None else None
        return None

    def _client_service_of(self, module: _Module, node: ast.Call, form: tuple[_Wrapper, bool]) -> str | None:
        wrapper, primitive = form
        if wrapper.service is not None:
            return wrapper.service
        return self._service_of(module, node.args[0]) if primitive and node.args else None

    def _passed_on(self, module: _Module, node: ast.Call, operation: ast.AST | None) -> Function | None:
        """The enclosing function, if `operation` is one of its parameters."""
        scopes = module.scopes.get(node, ())
        function = scopes[-1] if scopes else None
        if isinstance(operation, ast.Name) and function is not None and operation.id in _params(function):
            return function
        return None

    def find_wrappers(self) -> None:
        """Functions that pass a parameter on as the operation of a call form, to a fixed point."""
        changed = True
        while changed:
            changed = False
            for module in self.modules:
                for node in ast.walk(module.tree):
                    form = self._form(module, node) if isinstance(node, ast.Call) else None
                    if form is None:
                        continue
                    assert isinstance(node, ast.Call)
                    operation = _argument(node, form[0].index, form[0].keyword)
                    function = self._passed_on(module, node, operation)
                    if function is None or isinstance(function, ast.Lambda):
                        continue
                    assert isinstance(operation, ast.Name)
                    method = function in module.methods
                    self.result.call_forms.add((module.path, function.name))
                    index = _params(function).index(operation.id) - (1 if method else 0)
                    wrapper = _Wrapper(index, operation.id, self._client_service_of(module, node, form))
                    if not method:
                        if (module.name, function.name) not in self.functions:
                            self.functions[(module.name, function.name)] = wrapper
                            changed = True
                        continue
                    known = self.methods.get(function.name)
                    if known is None:
                        self.methods[function.name] = wrapper
                        changed = True
                    elif known != wrapper:
                        self._problem(module, function, f"two methods named {function.name!r} pass the operation on "
                                      "differently: rename one")  # fmt: skip

    def collect(self) -> None:
        for module in self.modules:
            for node in ast.walk(module.tree):
                if isinstance(node, ast.Call):
                    self._call(module, node)

    def _call(self, module: _Module, node: ast.Call) -> None:
        form = self._form(module, node)
        if form is not None:
            operation = _argument(node, form[0].index, form[0].keyword)
            name = _literal(operation)
            if name is not None:
                self._site(module, node, name, self._client_service_of(module, node, form))
            elif self._passed_on(module, node, operation) is None:
                self._problem(
                    module,
                    node,
                    "the operation of this call is neither a string literal nor a parameter its function passes on: "
                    "the sync test cannot see what it calls",
                )
            return
        if not module.reaches_aws:
            return
        if isinstance(node.func, ast.Name) and node.func.id == "getattr":
            name = _literal(node.args[1] if len(node.args) > 1 else None)
            if name is not None and name in self.client_methods:
                self._problem(module, node, f"getattr(…, {name!r}) calls an AWS operation the sync test cannot see: "
                              f"call it as call(client, {_operation_name(name)!r}, …)")  # fmt: skip
            return
        if not isinstance(node.func, ast.Attribute):
            return
        service = self._service_of(module, node.func.value)
        operations = self._operations(service) if service is not None else None
        if service is None or operations is None:
            self._unplaced(module, node, node.func)
            return
        method = node.func.attr
        if method in (_PAGINATOR, _WAITER):
            name = _literal(node.args[0] if node.args else None)
            table = self._waiters(service) if method == _WAITER else {xform_name(op): op for op in operations}
            if name is None or name not in table:
                self._problem(
                    module, node, f"{service}.{method}({name!r}) names no {service} operation this pass knows"
                )
                return
            self._site(module, node, table[name], service)
            return
        by_method = {xform_name(op): op for op in operations}
        if method in by_method:
            self._site(module, node, by_method[method], service)

    def _unplaced(self, module: _Module, node: ast.Call, func: ast.Attribute) -> None:
        """A call named like a client method (or a paginator or waiter with a literal name) on a receiver the pass
        cannot tell is a client of which service: a problem, unless NOT_CLIENTS says what it is."""
        called = ast.unparse(func)
        names_one = func.attr in (_PAGINATOR, _WAITER) and _literal(node.args[0] if node.args else None) is not None
        if (func.attr not in self.client_methods and not names_one) or (module.path, called) in NOT_CLIENTS:
            return
        self._problem(
            module,
            node,
            f"{called}(…) looks like an AWS call on a receiver this pass cannot tell the service of: call it through "
            'awsapi.clients.call on a client made in the same function (session.client("ec2", …)) or on a variable '
            "named after the service (ec2, ssm), or list it in aws_call_sites.NOT_CLIENTS with why it is not AWS",
        )

    @staticmethod
    def _waiters(service: str) -> dict[str, str]:
        try:
            model = _LOADER.get_waiter_model(service)
        except Exception:  # a service without waiters has no waiter model at all
            return {}
        return {xform_name(name): model.get_waiter(name).operation for name in model.waiter_names}

    def _site(self, module: _Module, node: ast.Call, operation: str, client_service: str | None) -> None:
        service = self._service_for(module, node, operation, client_service)
        if service is not None:
            named = [f.name for f in module.scopes.get(node, ()) if not isinstance(f, ast.Lambda)]
            function = named[-1] if named else ""
            self.result.sites.append(CallSite(module.path, node.lineno, service, operation, function))


def _operation_name(method: str) -> str:
    """The operation a client method name stands for, for a message (delete_snapshot → DeleteSnapshot)."""
    return "".join(part.capitalize() for part in method.split("_"))


def find_call_sites(src: Path, *, services: frozenset[str] | None = None) -> CallSites:
    """Every AWS call site in the package at `src` (e.g. src/amiforge). `services` overrides the services the code
    makes clients for (the reader's own tests use it)."""
    reader = _Reader(src, services)
    reader.find_wrappers()
    reader.collect()
    reader.result.sites.sort()
    return reader.result
