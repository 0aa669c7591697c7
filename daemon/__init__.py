"""lrpilot.daemon: the service side of lrpilot and the ``lrpilot`` command line.

Kept empty of imports so that ``lrpilot simulate`` starts without loading the
exporter or the Grafana client.
"""
