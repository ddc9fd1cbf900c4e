"""VM mobility data plane.

Live-migrates running QEMU/KVM virtual machines across clusters (CCLM) and
across storage backends (SLM), with non-shared disks on any storage.

Layers (imports point down only)::

    dataplane.cli, dataplane.daemon     command line and node daemon
    dataplane.migration                 CCLM / SLM orchestration
    dataplane.channel, dataplane.storage
    qmp_driver, dataplane.native        QEMU control, native byte kernels
"""

__version__ = "0.1.0"
