"""Discover a server's variables and print a ready-to-paste device config (`gateway browse`).

:func:`browse` walks the address space from a start node (default the Objects
folder) along hierarchical references, down to ``depth`` levels, and returns
every Variable it meets (properties such as EngineeringUnits and the standard
``Server`` object are skipped) with its NodeId in the namespace-URI form, its
browse path, data type and engineering unit. :func:`render_config` turns the
result into a ``[[devices]]`` TOML block.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds
from pydantic import ValidationError

from drivers.opcua.config import (
    OBJECTS_FOLDER,
    ROOT_FOLDER,
    OpcUaConnection,
    format_browse_path,
    format_node_id,
    parse_browse_path,
    parse_node_id,
)
from drivers.opcua.driver import (
    cert_dir_for,
    chunks,
    close_client,
    make_node_id,
    open_session,
    path_element,
    plain_node_id,
    to_ua_node_id,
)
from drivers.opcua.units import ucum_from_eu

_BATCH = 200
_NODE_KINDS = {
    ua.NodeIdType.TwoByte: "i",
    ua.NodeIdType.FourByte: "i",
    ua.NodeIdType.Numeric: "i",
    ua.NodeIdType.String: "s",
    ua.NodeIdType.Guid: "g",
    ua.NodeIdType.ByteString: "b",
}
_TAG_BAD = re.compile(r"[^A-Za-z0-9_.:/%-]+")


@dataclass(frozen=True, slots=True)
class BrowsedVariable:
    """One variable found by :func:`browse`."""

    node_id: str  # namespace-URI form: nsu=<uri>;s=... (namespace 0: i=...)
    browse_path: str  # from the start node, in the driver's browse_path syntax
    display_name: str
    data_type: str  # e.g. "Double"; a NodeId string for server-specific types
    unit: str  # UCUM code from EngineeringUnits, "" when none or unmapped
    eu_display: str  # EngineeringUnits display name as the server gives it, "" when none


async def browse(
    endpoint: str,
    *,
    start: str = OBJECTS_FOLDER,
    depth: int = 10,
    max_variables: int = 10_000,
    include_server: bool = False,
    security_policy: str = "None",
    security_mode: str | None = None,
    username: str | None = None,
    password: str | None = None,
    password_file: Path | None = None,
    user_cert: Path | None = None,
    user_key: Path | None = None,
    client_cert_dir: Path | None = None,
    server_cert: Path | None = None,
    server_cert_sha256: str | None = None,
    trust_on_first_use: bool = False,
    timeout: float = 5.0,
) -> list[BrowsedVariable]:
    """Every variable below ``start`` (up to ``depth`` levels, at most ``max_variables``).

    The connection arguments are the device config keys of the same names;
    ``client_cert_dir`` (needed for Sign/SignAndEncrypt and trust on first use)
    defaults to ``$GATEWAY_STATE_DIR/opcua``.
    Raises ValueError for invalid arguments; connection failures raise what
    :func:`drivers.opcua.driver.open_session` raises (OSError, TimeoutError,
    asyncua errors, UntrustedCertificate, ConfigError).
    """
    settings: dict[str, Any] = {
        "endpoint": endpoint,
        "security_policy": security_policy,
        "security_mode": security_mode,
        "username": username,
        "password": password,
        "password_file": password_file,
        "user_cert": user_cert,
        "user_key": user_key,
        "client_cert_dir": client_cert_dir,
        "server_cert": server_cert,
        "server_cert_sha256": server_cert_sha256,
        "trust_on_first_use": trust_on_first_use,
        "timeout": timeout,
    }
    try:
        conn = OpcUaConnection.model_validate(settings)
        start_ref = parse_node_id(start)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ValueError(problems) from None
    if depth < 1 or max_variables < 1:
        raise ValueError("depth and max_variables must be at least 1")
    holder: list[Client] = []
    try:
        client = await open_session(
            conn, cert_dir=cert_dir_for(conn, None), on_client=holder.append
        )
        namespaces: list[str] = await client.get_namespace_array()
        start_node = to_ua_node_id(start_ref, namespaces)
        if start_node is None:
            raise ValueError(f"start node namespace {start_ref.namespace} is not on the server")
        return await _walk(client, namespaces, start_node, depth, max_variables, include_server)
    finally:
        if holder:
            await close_client(holder[0], timeout)


def node_id_text(node: ua.NodeId, namespaces: Sequence[str]) -> str:
    """A NodeId in the namespace-URI form (namespace 0 stays plain: ``i=2258``)."""
    kind = _NODE_KINDS.get(node.NodeIdType, "s")
    ns = node.NamespaceIndex
    namespace: int | str = namespaces[ns] if 0 < ns < len(namespaces) else ns
    return format_node_id(namespace, kind, node.Identifier)


def _ns(index: int, namespaces: Sequence[str]) -> int | str:
    return namespaces[index] if 0 < index < len(namespaces) else index


async def _walk(
    client: Client,
    namespaces: Sequence[str],
    start: ua.NodeId,
    depth: int,
    max_variables: int,
    include_server: bool,
) -> list[BrowsedVariable]:
    root_prefix: list[tuple[int | str, str]] = []
    if start == make_node_id(ObjectIds.ObjectsFolder, 0, None):
        root_prefix = [(0, "Objects")]  # paths then work with the default browse_start (Root)
    server_node = make_node_id(ObjectIds.Server, 0, None)
    has_property = make_node_id(ObjectIds.HasProperty, 0, None)
    seen = {start}
    frontier: list[tuple[ua.NodeId, list[tuple[int | str, str]]]] = [(start, root_prefix)]
    found: list[tuple[ua.NodeId, list[tuple[int | str, str]], str]] = []
    for _level in range(depth):
        if not frontier or len(found) >= max_variables:
            break
        next_frontier: list[tuple[ua.NodeId, list[tuple[int | str, str]]]] = []
        for batch in chunks(frontier, _BATCH):
            refs = await _browse_children(client, [n for n, _ in batch])
            for (_parent, path), children in zip(batch, refs, strict=True):
                for ref in children:
                    if ref.ReferenceTypeId == has_property:
                        continue
                    node = plain_node_id(ref.NodeId)
                    if node in seen or (node == server_node and not include_server):
                        continue
                    seen.add(node)
                    name = ref.BrowseName
                    child_path = [*path, (_ns(name.NamespaceIndex, namespaces), name.Name or "")]
                    if ref.NodeClass == ua.NodeClass.Variable and len(found) < max_variables:
                        display = ref.DisplayName.Text if ref.DisplayName else None
                        found.append((node, child_path, display or name.Name or ""))
                    next_frontier.append((node, child_path))
        frontier = next_frontier
    return await _describe(client, namespaces, found)


async def _browse_children(client: Client, nodes: Sequence[ua.NodeId]) -> list[list[Any]]:
    descriptions = []
    for node in nodes:
        fields: dict[str, Any] = {
            "NodeId": node,
            "BrowseDirection": ua.BrowseDirection.Forward,
            "ReferenceTypeId": make_node_id(ObjectIds.HierarchicalReferences, 0, None),
            "IncludeSubtypes": True,
            "NodeClassMask": int(ua.NodeClass.Object) | int(ua.NodeClass.Variable),
            "ResultMask": 63,  # everything
        }
        descriptions.append(ua.BrowseDescription(**fields))
    params = ua.BrowseParameters()
    params.NodesToBrowse = descriptions
    results = await client.uaclient.browse(params)
    out: list[list[Any]] = []
    for res in results:
        refs = list(res.References or [])
        point = res.ContinuationPoint
        while point:
            nxt = ua.BrowseNextParameters()
            nxt.ContinuationPoints = [point]
            more = await client.uaclient.browse_next(nxt)
            refs.extend(more[0].References or [])
            point = more[0].ContinuationPoint
        out.append(refs)
    return out


async def _describe(
    client: Client,
    namespaces: Sequence[str],
    found: list[tuple[ua.NodeId, list[tuple[int | str, str]], str]],
) -> list[BrowsedVariable]:
    nodes = [n for n, _, _ in found]
    data_types: list[Any] = []
    for node_batch in chunks(nodes, _BATCH):
        data_types.extend(
            await client.uaclient.read_attributes(list(node_batch), AttributeIds.DataType)
        )
    eu_nodes: dict[int, ua.NodeId] = {}
    prop = ua.RelativePath([path_element(ObjectIds.HasProperty, "EngineeringUnits", 0)])
    indices = list(range(len(nodes)))
    for batch in chunks(indices, _BATCH):
        paths = [ua.BrowsePath(StartingNode=nodes[i], RelativePath=prop) for i in batch]
        results = await client.uaclient.translate_browsepaths_to_nodeids(paths)
        for i, res in zip(batch, results, strict=True):
            if res.StatusCode.value == 0 and res.Targets:
                eu_nodes[i] = plain_node_id(res.Targets[0].TargetId)
    eus: dict[int, Any] = {}
    keys = list(eu_nodes)
    for batch in chunks(keys, _BATCH):
        values = await client.uaclient.read_attributes(
            [eu_nodes[i] for i in batch], AttributeIds.Value
        )
        for i, dv in zip(batch, values, strict=True):
            value = dv.Value.Value if dv.Value is not None else None
            if isinstance(value, ua.EUInformation):
                eus[i] = value
    out = []
    for k, (node, path, display) in enumerate(found):
        dt = data_types[k].Value.Value if data_types[k].Value is not None else None
        if isinstance(dt, ua.NodeId) and dt.NamespaceIndex == 0 and isinstance(dt.Identifier, int):
            type_name = ObjectIdNames.get(dt.Identifier, node_id_text(dt, namespaces))
        elif isinstance(dt, ua.NodeId):
            type_name = node_id_text(dt, namespaces)
        else:
            type_name = ""
        eu = eus.get(k)
        unit = eu_text = ""
        if eu is not None:
            eu_text = (eu.DisplayName.Text if eu.DisplayName else None) or ""
            desc = eu.Description.Text if eu.Description else None
            unit = ucum_from_eu(eu.UnitId, eu_text, desc, eu.NamespaceUri)
        out.append(
            BrowsedVariable(
                node_id=node_id_text(node, namespaces),
                browse_path=format_browse_path(path),
                display_name=display,
                data_type=type_name,
                unit=unit,
                eu_display=eu_text,
            )
        )
    return out


def tag_name(variable: BrowsedVariable) -> str:
    """A valid tag name from a variable's browse path (``Bioreactor.Temperature``)."""
    names = [seg.name for seg in parse_browse_path(variable.browse_path)]
    if names and names[0] == "Objects" and len(names) > 1:
        names = names[1:]
    text = _TAG_BAD.sub("_", ".".join(names)).strip(".") or "tag"
    if not re.match(r"^[A-Za-z0-9_]", text):
        text = "_" + text
    return text[:128]


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def render_config(
    variables: Sequence[BrowsedVariable],
    *,
    endpoint: str,
    device_id: str = "opcua-1",
    mode: str = "subscribe",
    publishing_interval: float = 1.0,
    start: str = OBJECTS_FOLDER,
    security_policy: str = "None",
    security_mode: str | None = None,
    server_cert_sha256: str | None = None,
) -> str:
    """A ``[[devices]]`` block reading ``variables``, ready to paste into a config file.

    ``start`` is the node :func:`browse` started from (its browse paths are
    relative to it, or to Root when it was the Objects folder). Tags are
    addressed by NodeId (namespace-URI form); the browse path follows as a
    comment. Units are written when the server's EngineeringUnits map to UCUM;
    otherwise a comment says what the server gave.
    """
    lines = [
        f"# {len(variables)} variable(s) browsed on {endpoint}",
        "[[devices]]",
        f"id = {_toml(device_id)}",
        'driver = "opcua"',
        f"endpoint = {_toml(endpoint)}",
        f"mode = {_toml(mode)}",
    ]
    if mode == "subscribe":
        lines.append(f"publishing_interval = {publishing_interval!r}")
    if security_policy != "None":
        lines.append(f"security_policy = {_toml(security_policy)}")
        if security_mode is not None:
            lines.append(f"security_mode = {_toml(security_mode)}")
        if server_cert_sha256:
            lines.append(f"server_cert_sha256 = {_toml(server_cert_sha256)}")
        else:
            lines.append('trust_on_first_use = true  # or server_cert_sha256 = "..."')
    if start not in (ROOT_FOLDER, OBJECTS_FOLDER):
        lines.append(f"browse_start = {_toml(start)}  # the commented browse paths start here")
    used: dict[str, int] = {}
    for v in variables:
        name = tag_name(v)
        if name in used:
            used[name] += 1
            name = f"{name[:120]}_{used[name]}"
        else:
            used[name] = 1
        lines += ["", "[[devices.tags]]", f"name = {_toml(name)}", f"node_id = {_toml(v.node_id)}"]
        lines.append(f"# browse_path = {_toml(v.browse_path)}")
        about = f"# {v.display_name}"
        if v.data_type:
            about += f", {v.data_type}"
        lines.append(about)
        if v.unit:
            lines.append(f"unit = {_toml(v.unit)}")
        elif v.eu_display:
            lines.append(f"# unit: the server says {_toml(v.eu_display)} (no UCUM mapping known)")
    return "\n".join(lines) + "\n"
