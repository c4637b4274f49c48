"""A fake OpenAI-compatible model server, run as a real subprocess by the tests.

Behaviour is chosen by flags so one file covers every scenario: slow loads,
crashes, SIGTERM-ignoring servers, grandchildren, streaming.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

from aiohttp import web


SLOT_CONTEXT = 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="fake")
    p.add_argument("-np", "--parallel", type=int, default=2, help="slots /slots reports")
    p.add_argument("--load-delay", type=float, default=0.0, help="seconds /health answers 503")
    p.add_argument("--exit-at-start", type=int, default=None, help="exit with this code right away")
    p.add_argument("--never-healthy", action="store_true")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--grandchild-pid-file", default=None, help="fork a grandchild and write its pid here")
    p.add_argument("--pid-file", default=None)
    p.add_argument("--start-log", default=None, help="append a line per start to this file")
    p.add_argument("--empty-chat", action="store_true", help="answer chat with empty content")
    p.add_argument("--error-every", type=int, default=0, help="answer every Nth chat request with a 500")
    p.add_argument("--at-once", type=int, default=0,
                   help="work on at most this many chat requests at a time; the rest wait in arrival order")
    p.add_argument("--invalid-json-every", type=int, default=0,
                   help="with response_format: every Nth answer is JSON that breaks the usual schema")
    p.add_argument("--drop-first-chat", action="store_true",
                   help="close the connection of the first chat request without answering")
    p.add_argument("--gpu-log-mib", type=int, default=0,
                   help="print llama.cpp's log line for a CUDA0 model buffer of this size")
    p.add_argument("--chunks", type=int, default=5, help="events of a streamed chat answer, unless the request says")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between them, unless the request says")
    p.add_argument("--playground", action="store_true",
                   help="answer /v1/completions (streamed), /v1/embeddings and /v1/rerank instead of echoing them")
    p.add_argument("--alloc-mib", type=int, default=0, help="hold this much touched memory (for measurement)")
    p.add_argument("--echo-cors", action="store_true",
                   help="allow the request's Origin (else any) with credentials on every answer, as a permissive "
                        "model server does")
    p.add_argument("--request-log", default=None, help="append a line per request to this file: METHOD PATH AUTH")
    p.add_argument("--oom-once", default=None,
                   help="at the first start (this marker file absent): create it, print an allocation failure, exit 1")
    args, _ = p.parse_known_args()  # llama-server flags berth adds (-m, --slots ...) are accepted and ignored
    return args


def main() -> None:
    args = parse_args()
    print(f"fake server {args.name} starting on port {args.port}", flush=True)
    if args.start_log:
        with open(args.start_log, "a") as fh:
            fh.write(f"{args.name} {os.getpid()}\n")
    if args.oom_once and not os.path.exists(args.oom_once):
        open(args.oom_once, "w").close()
        print("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: "
              "cudaMalloc failed: out of memory", flush=True)
        sys.exit(1)
    if args.gpu_log_mib:
        print(f"load_tensors:        CUDA0 model buffer size = {args.gpu_log_mib:8.2f} MiB", flush=True)
    held = bytearray(args.alloc_mib * 1024 * 1024)
    for offset in range(0, len(held), 4096):  # touch every page so it is resident
        held[offset] = 1
    if args.exit_at_start is not None:
        print("fatal: could not load model file /nope.gguf", flush=True)
        sys.exit(args.exit_at_start)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.pid_file:
        with open(args.pid_file, "w") as fh:
            fh.write(str(os.getpid()))
    if args.grandchild_pid_file:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        with open(args.grandchild_pid_file, "w") as fh:
            fh.write(str(child.pid))
    ready_at = time.monotonic() + args.load_delay

    async def health(request: web.Request) -> web.Response:
        if args.never_healthy or time.monotonic() < ready_at:
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response({"status": "ok"})

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        response = web.json_response({
            "server": args.name, "pid": os.getpid(), "path": request.path, "query": request.query_string,
            "method": request.method, "body": body.decode(errors="replace"),
            "headers": dict(request.headers), "env": {k: v for k, v in os.environ.items() if k.startswith("FAKE_")},
        })
        if "gzip" in request.query:
            response.enable_compression()  # honours the client's Accept-Encoding
        return response

    chat_count = 0
    active: dict[int, list[int]] = {}  # chat number -> [prompt tokens, tokens sent], while it runs
    served = 0  # chat requests that began their work, in order (the `number` of an answer)
    at_once = asyncio.Semaphore(args.at_once) if args.at_once else None

    def content_for(payload: dict, i: int | None = None) -> str:
        if payload.get("response_format"):  # one JSON object, as a structured-output server would send
            if i:
                return ""
            bad = args.invalid_json_every and chat_count % args.invalid_json_every == 0
            return json.dumps({"answer": 42} if bad else {"answer": f"hello from {args.name}"})
        if args.empty_chat:
            return ""
        return f"hello from {args.name}" if i is None else f"tok{i} "

    async def chat(request: web.Request) -> web.StreamResponse:
        nonlocal chat_count
        payload = await request.json()
        chat_count += 1
        if args.drop_first_chat and chat_count == 1:
            print("dropping the first chat request's connection", flush=True)
            request.transport.close()
            return web.Response()
        if args.error_every and chat_count % args.error_every == 0:
            return web.json_response({"error": {"message": "fake overload", "type": "server_error",
                                                "code": "fake_overload"}}, status=500)
        if "upstream_error" in payload:  # exactly this error: {"status", "body" (text or JSON), "headers"}
            wanted = payload["upstream_error"]
            if isinstance(wanted["body"], str):
                return web.Response(text=wanted["body"], status=wanted["status"], headers=wanted.get("headers"))
            return web.json_response(wanted["body"], status=wanted["status"], headers=wanted.get("headers"))
        if payload.get("llama_error"):  # llama.cpp's own error shape: an integer code
            return web.json_response({"error": {"code": 501, "message": "tools param requires --jinja flag",
                                                "type": "not_supported_error"}}, status=501)
        if payload.get("text_error"):
            return web.Response(text="upstream exploded", status=500)
        sleep = float(payload.get("sleep", 0))
        chunks = int(payload.get("chunks", args.chunks))
        # one "token" per word of the messages, so a client can tell prompts apart by their usage
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in payload.get("messages") or []) or 1
        delay = float(payload.get("chunk_delay", args.chunk_delay))
        crash_after = payload.get("crash_after_chunks")
        if at_once is None:
            return await serve(request, payload, prompt_tokens, sleep, chunks, delay, crash_after)
        async with at_once:
            return await serve(request, payload, prompt_tokens, sleep, chunks, delay, crash_after)

    async def serve(request, payload, prompt_tokens, sleep, chunks, delay, crash_after):
        nonlocal served
        served += 1
        number = served
        active[number] = [prompt_tokens, 0]
        try:
            return await answer(request, payload, number, prompt_tokens, sleep, chunks, delay, crash_after)
        finally:
            active.pop(number, None)

    async def answer(request, payload, number, prompt_tokens, sleep, chunks, delay, crash_after):
        if payload.get("tools"):
            return await call_tool(request, payload, prompt_tokens)
        while payload.get("hold_file") and not os.path.exists(payload["hold_file"]):  # held until the test says
            await asyncio.sleep(0.05)
        if not payload.get("stream"):
            await asyncio.sleep(sleep)
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "model": payload.get("model"),
                "server": args.name, "pid": os.getpid(), "number": number,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content_for(payload)},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3,
                          "total_tokens": prompt_tokens + 3},
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(sleep)
        try:
            for i in range(chunks):
                if crash_after is not None and i == int(crash_after):
                    os.kill(os.getpid(), signal.SIGKILL)
                chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": payload.get("model"),
                         "choices": [{"index": 0, "delta": {"content": content_for(payload, i)},
                                      "finish_reason": None}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                active[number][1] = i + 1
                if delay:
                    await asyncio.sleep(delay)
        except (ConnectionResetError, asyncio.CancelledError):
            print(f"stream aborted by client after {i} chunks", flush=True)
            raise
        await response.write(b'data: {"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d}}\n\n'
                             % (prompt_tokens, chunks))
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(float(payload.get("end_delay", 0.0)))  # the stream's end can lag its [DONE]
        await response.write_eof()
        return response

    async def call_tool(request, payload, prompt_tokens):
        """A request with tools: the first tool is called with {"city": "Paris"}, the arguments streamed in
        pieces as OpenAI-compatible servers stream them."""
        name = payload["tools"][0]["function"]["name"]
        pieces = ['{"city"', ': "Par', 'is"}']
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces)}
        if not payload.get("stream"):
            call = {"id": "call_fake", "type": "function", "function": {"name": name, "arguments": "".join(pieces)}}
            return web.json_response({"object": "chat.completion", "model": payload.get("model"), "usage": usage,
                                      "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                                          "role": "assistant", "content": None, "tool_calls": [call]}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        deltas = [{"index": 0, "id": "call_fake", "type": "function", "function": {"name": name, "arguments": ""}}]
        deltas += [{"index": 0, "function": {"arguments": piece}} for piece in pieces]
        for delta in deltas:
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [delta]},
                                                                     "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        end = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
        await response.write(f"data: {json.dumps(end)}\n\ndata: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                             "data: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    @web.middleware
    async def record(request: web.Request, handler) -> web.StreamResponse:
        if args.request_log:
            with open(args.request_log, "a") as fh:
                fh.write(f"{request.method} {request.path} {request.headers.get('Authorization', '-')}\n")
        return await handler(request)

    async def allow_any_origin(request: web.Request, response: web.StreamResponse) -> None:
        if args.echo_cors:
            response.headers["Access-Control-Allow-Origin"] = request.headers.get("Origin", "*")
            response.headers["Access-Control-Allow-Credentials"] = "true"

    app = web.Application(middlewares=[record])
    app.on_response_prepare.append(allow_any_origin)
    app.router.add_get("/health", health)
    async def slots(request: web.Request) -> web.Response:
        # llama-server's shape: a slot per parallel sequence; busy ones hold their prompt and what they decoded,
        # an idle one the prompt of the last request it served (none if it never served one)
        busy = list(active.values())
        return web.json_response([
            {"id": i, "n_ctx": SLOT_CONTEXT, "is_processing": i < len(busy),
             "n_prompt_tokens": busy[i][0] if i < len(busy) else (12 if i < chat_count else 0),
             "next_token": [{"n_decoded": busy[i][1] if i < len(busy) else 0}]}
            for i in range(max(args.parallel, len(busy)))])

    async def slot_action(request: web.Request) -> web.Response:  # a server whose slot storage is broken
        return web.json_response({"error": {"code": 500, "message": "failed to open slot file"}}, status=500)

    async def transcription(request: web.Request) -> web.Response:  # OpenAI's audio upload shape
        form = await request.post()
        upload = form["file"]
        return web.json_response({"text": f"{args.name} heard {len(upload.file.read())} bytes",
                                  "model": form.get("model")})

    async def image(request: web.Request) -> web.Response:
        payload = await request.json()
        return web.json_response({"created": 0, "data": [{"b64_json": "", "revised_prompt":
                                                          f"{args.name}: {payload.get('prompt')}"}],
                                  "model": payload.get("model")})

    def vector(text: str) -> list[float]:  # a deterministic embedding: letter counts, so alike texts are alike
        counts = [float(text.lower().count(letter)) for letter in "etaoinshrdlu"]
        norm = sum(c * c for c in counts) ** 0.5 or 1.0
        return [c / norm for c in counts]

    async def embeddings(request: web.Request) -> web.Response:
        payload = await request.json()
        inputs = payload.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        return web.json_response({"object": "list", "model": payload.get("model"),
                                  "data": [{"object": "embedding", "index": i, "embedding": vector(t)}
                                           for i, t in enumerate(texts)],
                                  "usage": {"prompt_tokens": sum(len(t.split()) for t in texts),
                                            "total_tokens": sum(len(t.split()) for t in texts)}})

    async def rerank(request: web.Request) -> web.Response:  # score: words shared with the query
        payload = await request.json()
        query = set(str(payload.get("query", "")).lower().split())
        scores = [len(query & set(str(d).lower().split())) for d in payload.get("documents") or []]
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        return web.json_response({"model": payload.get("model"),
                                  "results": [{"index": i, "relevance_score": float(scores[i])} for i in ranked]})

    async def completion(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if not payload.get("stream"):
            return web.json_response({"object": "text_completion", "model": payload.get("model"),
                                      "choices": [{"index": 0, "text": f"hello from {args.name}"}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 3}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(5):
            chunk = {"object": "text_completion", "choices": [{"index": 0, "text": f"word{i} "}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    if args.playground:  # otherwise these paths echo the request, as tests of routing read them
        app.router.add_post("/v1/embeddings", embeddings)
        app.router.add_post("/v1/rerank", rerank)
        app.router.add_post("/v1/completions", completion)
    app.router.add_post("/v1/audio/transcriptions", transcription)
    app.router.add_post("/v1/audio/translations", transcription)
    app.router.add_post("/v1/images/generations", image)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/slots", slots)
    app.router.add_post("/slots/{id}", slot_action)
    app.router.add_route("*", "/{path:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, handle_signals=True)


if __name__ == "__main__":
    main()
