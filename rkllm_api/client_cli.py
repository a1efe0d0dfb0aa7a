"""`rkllm-api pull | run | ps | list | rm`: commands for people, talking to a running
server over its HTTP API (the same one every client uses).

The server is --url, else RKLLM_API_URL, else http://127.0.0.1:<RKLLM_API_PORT or
8000>; the key is --api-key, else RKLLM_API_KEY (pull and rm need an admin key once
keys are set).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Optional

import requests

COMMANDS = ("pull", "run", "ps", "list", "rm")
BYE = "/bye"


class CommandError(Exception):
    """One sentence for stderr; the command exits 1."""


class Client:
    def __init__(self, url: str, api_key: str = ""):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        try:
            response = requests.request(method, self.url + path, headers=self.headers, **kwargs)
        except requests.ConnectionError:
            raise CommandError(f"no rkllm-api server answers at {self.url}: start it with "
                               f"`rkllm-api` (or the service), or give --url") from None
        if response.status_code >= 400:
            raise CommandError(error_message(response))
        return response

    def json(self, method: str, path: str, **kwargs):
        return self.call(method, path, **kwargs).json()


def error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"the server answered {response.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or f"the server answered {response.status_code}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the server (default RKLLM_API_URL, else "
                                      "http://127.0.0.1:<RKLLM_API_PORT or 8000>)")
    common.add_argument("--api-key", help="API key (default RKLLM_API_KEY)")
    parser = argparse.ArgumentParser(prog="rkllm-api", description="Use a running rkllm-api server.")
    commands = parser.add_subparsers(dest="command", required=True)
    pull = commands.add_parser("pull", parents=[common], help="download a model from Hugging Face")
    pull.add_argument("repo", help="owner/name, or owner/name/FILE to pick the file")
    run = commands.add_parser("run", parents=[common],
                              help="chat with a model in the terminal (/bye leaves)")
    run.add_argument("model")
    run.add_argument("prompt", nargs="*", help="answer this one prompt and exit")
    commands.add_parser("ps", parents=[common], help="the loaded models")
    commands.add_parser("list", parents=[common], help="the installed models")
    rm = commands.add_parser("rm", parents=[common], help="remove a model from the models folder")
    rm.add_argument("model")
    return parser


def server_url(environ) -> str:
    return environ.get("RKLLM_API_URL") or f"http://127.0.0.1:{environ.get('RKLLM_API_PORT') or 8000}"


def main(argv, environ=None, stdin=None, stdout=None) -> int:
    environ = os.environ if environ is None else environ
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    args = build_parser().parse_args(argv)
    client = Client(args.url or server_url(environ), args.api_key or environ.get("RKLLM_API_KEY", ""))
    try:
        if args.command == "pull":
            return pull(client, args.repo, stdout)
        if args.command == "run":
            return run(client, args.model, " ".join(args.prompt), stdin, stdout)
        if args.command == "ps":
            return show_table(stdout, *ps_rows(client))
        if args.command == "list":
            return show_table(stdout, *list_rows(client))
        return remove(client, args.model, stdout)
    except CommandError as exc:
        print(f"rkllm-api {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- pull

def pull(client: Client, spec: str, out) -> int:
    """Status lines as they come; one progress bar per file (size, speed and time
    left, tqdm's), closed before the next line so bars never overwrite each other."""
    from tqdm import tqdm
    response = client.call("POST", "/api/pull", json={"model": spec, "stream": True},
                           stream=True, timeout=(30, None))
    bar, digest = None, None
    try:
        for line in response.iter_lines():
            if not line:
                continue
            event = json.loads(line)
            if event.get("digest") != digest and bar is not None:
                bar.close()
                bar = None
            if "error" in event:
                raise CommandError(event["error"])
            digest = event.get("digest")
            if digest is None:
                out.write(event["status"] + "\n")
                out.flush()
                continue
            if bar is None:
                bar = tqdm(total=event["total"], unit="B", unit_scale=True, unit_divisor=1024,
                           desc=event["status"].removeprefix("pulling "), file=out,
                           dynamic_ncols=True, mininterval=0.2)
            bar.update(event["completed"] - bar.n)
    finally:
        if bar is not None:
            bar.close()
    return 0


# ---------------------------------------------------------------- run

def run(client: Client, model: str, prompt: str, stdin, out) -> int:
    card = client.json("GET", f"/v1/models/{model}")
    messages: list = []
    if prompt:
        chat_turn(client, card["id"], messages, prompt, out)
        return 0
    interactive = stdin.isatty()
    if interactive:
        out.write(f"chatting with {card['id']} ({card['device']}); {BYE} leaves\n")
    while True:
        if interactive:
            out.write(">>> ")
            out.flush()
        line = stdin.readline()
        if not line or line.strip() == BYE:
            return 0
        if line.strip():
            chat_turn(client, card["id"], messages, line.strip(), out)


def chat_turn(client: Client, model: str, messages: list, text: str, out) -> str:
    """Streams one answer to out (thinking between "Thinking..." and "...done
    thinking."), and keeps the exchange in messages."""
    messages.append({"role": "user", "content": text})
    response = client.call("POST", "/v1/chat/completions", stream=True, timeout=(30, None),
                           json={"model": model, "messages": messages, "stream": True})
    answer, thinking = [], False
    for line in response.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise CommandError(error_message_of(chunk))
        delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
        reasoning, content = delta.get("reasoning_content"), delta.get("content")
        if reasoning:
            if not thinking:
                out.write("Thinking...\n")
                thinking = True
            out.write(reasoning)
        if content:
            if thinking:
                out.write("\n...done thinking.\n\n")
                thinking = False
            answer.append(content)
            out.write(content)
        out.flush()
    out.write("\n\n")
    out.flush()
    messages.append({"role": "assistant", "content": "".join(answer)})
    return "".join(answer)


def error_message_of(chunk: dict) -> str:
    error = chunk["error"]
    return error.get("message", str(error)) if isinstance(error, dict) else str(error)


# ---------------------------------------------------------------- ps, list, rm

def ps_rows(client: Client) -> tuple:
    running = client.json("GET", "/api/ps")["models"]
    devices = client.json("GET", "/health")["devices"]
    state = {d["model"]: (name, d) for name, d in devices.items() if d["model"]}
    rows = []
    for entry in running:
        name = entry["name"].removesuffix(":latest")   # Ollama's tag; ids have none
        device, slot = state.get(name, ("?", {}))
        busy = "busy" if slot.get("busy") else "idle"
        queue = slot.get("queue_length", 0)
        rows.append((name, device, _size(entry.get("size", 0)),
                     busy + (f", {queue} waiting" if queue else ""),
                     _until(entry.get("expires_at"))))
    return ("NAME", "DEVICE", "SIZE", "STATE", "UNLOADS IN"), rows


def list_rows(client: Client) -> tuple:
    models = [m for m in client.json("GET", "/v1/models")["data"] if not m.get("parent")]
    rows = [(m["id"], m["device"], str(m["context_length"]), ",".join(m["capabilities"]),
             "ok" if m.get("available", True) else m.get("problem", "unavailable"))
            for m in models]
    return ("NAME", "DEVICE", "CONTEXT", "CAPABILITIES", "STATUS"), rows


def remove(client: Client, model: str, out) -> int:
    deleted = client.json("DELETE", f"/v1/models/{model}")
    out.write(f"deleted {deleted['id']}\n")
    return 0


def show_table(out, header: tuple, rows: list) -> int:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        out.write("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                  + "\n")
    return 0


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _until(expires_at: Optional[str]) -> str:
    """"4 minutes" from an ISO time; "never" for Ollama's far-future expiry."""
    if not expires_at:
        return "-"
    try:
        moment = datetime.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return expires_at
    seconds = (moment - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    if seconds > 10 * 365 * 86400:
        return "never"
    if seconds < 60:
        return f"{max(0, int(seconds))} seconds"
    return f"{int(seconds // 60)} minutes"
