"""A gRPC client (grpcio) for the end-to-end tests: calls /test.Echo/Fail and
/test.Echo/Stream on TARGET for every status code and prints, as JSON, what the client
library saw of each call: code, message, trailing metadata and messages.
Usage: client.py TARGET
"""

import json
import sys

import grpc


def seen(metadata):
    out = []
    for key, value in metadata or ():
        out.append([key, value.hex() if isinstance(value, bytes) else value])
    return sorted(out)


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    fail = channel.unary_unary("/test.Echo/Fail")
    stream = channel.unary_stream("/test.Echo/Stream")
    calls = []
    for code in range(17):
        request = str(code).encode()
        try:
            body, call = fail.with_call(request, timeout=10)
            calls.append(["Fail", code, call.code().value[0], call.details(),
                          seen(call.trailing_metadata()), [body.hex()]])
        except grpc.RpcError as e:
            calls.append(["Fail", code, e.code().value[0], e.details(),
                          seen(e.trailing_metadata()), []])
        messages = []
        it = stream(request, timeout=10)
        try:
            for m in it:
                messages.append(m.hex())
        except grpc.RpcError:
            pass
        calls.append(["Stream", code, it.code().value[0], it.details(),
                      seen(it.trailing_metadata()), messages])
    print(json.dumps(calls))


if __name__ == "__main__":
    main()
