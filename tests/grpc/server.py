"""A gRPC server (grpcio, the C core) for the end-to-end tests.

/test.Echo/Fail takes a status code (as text) and answers it: OK with a body, or the
error as a trailers-only response, with a message and trailing metadata (text and
binary). /test.Echo/Stream sends two messages, then that status in trailers.
Usage: server.py ADDRESS (e.g. 0.0.0.0:50051); prints "ready" once serving.
"""

import sys
from concurrent import futures

import grpc


def status(code):
    return next(s for s in grpc.StatusCode if s.value[0] == code)


def metadata(code):
    return (("x-detail", f"detail {code}"), ("x-raw-bin", bytes([0, 1, 0xFF, code])))


def fail(request, context):
    code = int(request.decode())
    context.set_trailing_metadata(metadata(code))
    if code == 0:
        return b"fine"
    context.abort(status(code), f"message for {code}: \u00fcnic\u00f6de, spaces % and\nnewline")


def stream(request, context):
    code = int(request.decode())
    yield b"first"
    yield b"second"
    context.set_trailing_metadata(metadata(code))
    if code != 0:
        context.abort(status(code), f"stream ended with {code}")


def main():
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(sys.argv[1])
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
