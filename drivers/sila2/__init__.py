"""SiLA 2 driver (``driver = "sila2"``): feature properties as tags; see docs/drivers/sila2.md."""

import os

# gRPC's C core logs every failed TLS handshake to stderr at INFO; the driver
# reports connection failures itself (as $offline with the reason).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from drivers.sila2.driver import Sila2Driver

__all__ = ["Sila2Driver"]
