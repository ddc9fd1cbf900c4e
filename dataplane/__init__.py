"""VM mobility data plane.

Live-migrates running QEMU/KVM virtual machines across clusters (CCLM), with
non-shared disks on any storage. Storage live migration (SLM) and a node
daemon are the next stage.

Layers (imports point down only; docs/architecture.md)::

    dataplane.cli                       command line, one module per command group
    dataplane.migration                 CCLM orchestration
    dataplane.channel, dataplane.storage
    qmp_driver, dataplane.native        QEMU control, native byte kernels
    dataplane.aio, .units, .progress    leaves any layer may use
"""

__version__ = "0.1.0"
