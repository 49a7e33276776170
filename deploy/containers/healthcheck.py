"""The image's HEALTHCHECK: exit 0 while mrl-serve says it is serving, 1 otherwise (warming up, draining, down).

It follows the MRL_SERVE_* variables: GET /health on MRL_SERVE_HTTP_PORT (HTTPS when MRL_SERVE_TLS_CERT is
set; the server's own certificate is not checked on loopback), else gRPC health on MRL_SERVE_PORT. Settings
given as flags instead are not seen here: set ports and TLS through the environment in containers.
"""

import os
import ssl
import sys
import urllib.request

http_port = os.environ.get("MRL_SERVE_HTTP_PORT", "").strip()
tls = bool(os.environ.get("MRL_SERVE_TLS_CERT", "").strip())
try:
    if http_port:
        context = ssl._create_unverified_context() if tls else None  # loopback: the process checks itself
        scheme = "https" if tls else "http"
        urllib.request.urlopen(f"{scheme}://127.0.0.1:{http_port}/health", timeout=2, context=context)
    elif tls:
        sys.exit("healthcheck: gRPC with TLS and no HTTP port: set MRL_SERVE_HTTP_PORT to check /health")
    else:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{os.environ.get('MRL_SERVE_PORT', '50051')}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            sys.exit(1)
except Exception as e:  # any failure to get "serving" is unhealthy; say which
    sys.exit(f"healthcheck: {e}")
