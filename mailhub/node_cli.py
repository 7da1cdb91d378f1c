"""
``mailhub reload`` and ``mailhub drill``: commands that ask a running node,
through its admin API (``mailhub.web.admin_api``), to read its configuration
again or to send a probe through itself and follow it (``mailhub.drill``).

The node is ``--url URL`` with ``--token-file F`` (an operator token), or
``--node NAME`` of the configuration (its ``web`` endpoint; the token, if no
``--token-file`` is given, is the first operator token of ``[web]
api_tokens_file``), or else the configuration's first node with a web
listener.  One line on standard error and a non-zero status on failure;
``--json`` prints the node's answer as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mailhub.config import HubConfig
from mailhub.queue_cli import CommandFailed, https_policy, read_token_file

__all__ = ["add_parsers", "run"]


def add_parsers(sub: Any, default_config: str) -> None:
    """Add ``reload`` and ``drill`` to the ``mailhub`` parser's subparsers."""

    def node_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", default=default_config,
                       help="the hub's configuration, to find --node (default: $MAILHUB_CONFIG or mailhub.toml)")
        p.add_argument("--node", metavar="NAME", help="the configuration's node (default: the first with a web listener)")
        p.add_argument("--url", default=os.environ.get("MAILHUB_URL"),
                       help="the node's admin API (http[s]://host:port) (default: $MAILHUB_URL)")
        p.add_argument("--token-file", default=os.environ.get("MAILHUB_TOKEN_FILE"),
                       help="a file holding an operator token (default: $MAILHUB_TOKEN_FILE; with --node or"
                            " without --url: the first operator token of [web] api_tokens_file)")
        p.add_argument("--cafile", default=os.environ.get("MAILHUB_CAFILE"),
                       help="with an https URL: trust the certificates signed by this PEM file")
        p.add_argument("--json", action="store_true", help="the node's answer as JSON, for scripts")

    r = sub.add_parser("reload", help="make a running node read its configuration again (as SIGHUP), and say what changed")
    node_options(r)
    d = sub.add_parser("drill", help="send a probe through a node and follow it: accepted, archived, delivered")
    d.add_argument("domain", help="the hub domain to drill")
    node_options(d)
    d.add_argument("--to", metavar="ADDRESS", help="the probe's recipient (default: [drills] to, postmaster@DOMAIN)")
    d.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for the probe to be delivered (default: [drills] timeout, 120)")
    d.add_argument("--smtp", metavar="HOST:PORT", help="send to this address instead of the node's own listener")


async def run(reactor: Any, args: argparse.Namespace, config: HubConfig | None) -> int:
    """``mailhub reload`` or ``mailhub drill``; returns the exit status."""
    try:
        url, token = _target(args, config)
        if args.command == "reload":
            return await _reload(reactor, args, url, token)
        return await _drill(reactor, args, url, token)
    except CommandFailed as e:
        sys.stderr.write(f"mailhub: {e}\n")
        return e.code


def _target(args: argparse.Namespace, config: HubConfig | None) -> tuple[str, str]:
    """The node's API URL and the token to use."""
    url = args.url
    if not url or args.node:
        if config is None:
            raise CommandFailed("give the hub's configuration (-c FILE), or --url and --token-file", 2)
        if args.node and args.node not in config.nodes:
            raise CommandFailed(f"{config.path}: no node {args.node} (configured: {', '.join(config.nodes)})", 2)
        if args.node and not config.nodes[args.node].web:
            raise CommandFailed(f"{config.path}: nodes.{args.node}.web: not set, the node has no API: give --url", 2)
        names = [args.node] if args.node else [n for n, c in config.nodes.items() if c.web]
        if not names:
            raise CommandFailed(f"{config.path}: no node has a web listener (nodes.NAME.web): give --url", 2)
        url = _web_url(config.nodes[names[0]].web or "")
    if not url.startswith(("http://", "https://")):
        raise CommandFailed(f"--url {url}: give http://host:port or https://host:port", 2)
    if args.token_file:
        return url.rstrip("/"), read_token_file(args.token_file)
    if config is not None and config.web.get("api_tokens_file"):
        from mailhub.web.archive_api import read_token_roles

        path = config.web["api_tokens_file"]
        try:
            roles = read_token_roles(path)
        except (OSError, ValueError) as e:
            raise CommandFailed(f"{config.path}: web.api_tokens_file: {e}", 2) from None
        for token, (_, role) in roles.items():
            if role == "operator":
                return url.rstrip("/"), token
        raise CommandFailed(f"{path}: no operator token (mailhub token create NAME --role operator), or give --token-file", 2)
    raise CommandFailed("give --token-file FILE (a file holding an operator token)", 2)


def _web_url(endpoint: str) -> str:
    from twisted.internet.endpoints import _parseServer  # type: ignore[attr-defined]

    kind, args, kw = _parseServer(endpoint, None)
    if kind not in ("TCP", "SSL"):
        raise CommandFailed(f"the node's web listener {endpoint} is not tcp: or ssl:: give --url", 2)
    host = kw.get("interface") or "127.0.0.1"
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    # The node's own certificate names its hostname, not the address: --url and --cafile for https.
    return f"{'https' if kind == 'SSL' else 'http'}://{host}:{args[0]}"


async def _post(reactor: Any, args: argparse.Namespace, url: str, token: str, body: Any,
                timeout: float) -> tuple[int, Any]:
    """POST ``body`` as JSON; the answer's status and JSON."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, contextFactory=https_policy(args.cafile), pool=pool))
    headers: dict[bytes | str, bytes | str] = {"Authorization": f"Bearer {token}"}
    try:
        response = await http.post(url, json=body, headers=headers, timeout=timeout)
        data = await response.content()
    except Exception as e:  # noqa: BLE001 - refused, timed out, TLS: one line
        raise CommandFailed(f"cannot reach {url}: {e}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise CommandFailed(f"{url}: {response.code} {data[:200].decode('utf-8', 'replace').strip()}") from None
    return response.code, answer


async def _reload(reactor: Any, args: argparse.Namespace, url: str, token: str) -> int:
    code, answer = await _post(reactor, args, url + "/api/reload", token, {}, 300)
    if args.json and code in (200, 422):
        print(json.dumps(answer, indent=2))
    if code == 422:
        for line in answer.get("errors", []):
            sys.stderr.write(f"mailhub: {line}\n")
        sys.stderr.write(f"mailhub: reload refused: {answer.get('error')}\n")
        return 1
    if code != 200:
        raise CommandFailed(f"{url}/api/reload: {code} {answer.get('error') if isinstance(answer, dict) else answer}")
    if not args.json:
        for line in answer["changes"]:
            print(f"changed: {line}")
        for key in answer["needs_restart"]:
            print(f"needs a restart: {key} (the running value stays until then)")
        if not answer["changes"] and not answer["needs_restart"]:
            print("reloaded: no changes")
    return 0


async def _drill(reactor: Any, args: argparse.Namespace, url: str, token: str) -> int:
    body = {k: v for k, v in (("domain", args.domain), ("to", args.to), ("timeout", args.timeout),
                              ("smtp", args.smtp)) if v is not None}
    code, answer = await _post(reactor, args, url + "/api/drills", token, body, (args.timeout or 3600) + 60)
    if code == 400:
        raise CommandFailed(str(answer.get("error")), 2)
    if code != 200:
        raise CommandFailed(f"{url}/api/drills: {code} {answer.get('error') if isinstance(answer, dict) else answer}")
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"drill {answer['id']} of {answer['domain']} through node {answer['node']} to {answer['recipient']}"
              f" (Message-ID {answer['message_id']})")
        for step in answer["steps"]:
            when = f"{step['seconds']:.2f} s" if step["seconds"] is not None else "-"
            print(f"  {step['step']:<10} {'ok' if step['ok'] else 'FAILED':<7} {when:>9}  {step['detail']}")
    if not answer["ok"]:
        failed = next(s for s in answer["steps"] if not s["ok"])
        sys.stderr.write(f"mailhub: drill of {answer['domain']} failed at {failed['step']}: {failed['detail']}\n")
        return 1
    return 0
