"""The workflow files shipped with the daemon (data only; `daemon.workflow_files` reads them).

Each `<name>.json` is one workflow; the format is described in `protocol.workflow`.
"""
