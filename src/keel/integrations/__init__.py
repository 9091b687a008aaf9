"""Keel's health checks where users already train: TRL (``keel.integrations.trl``), verl command lines
(``keel.integrations.verl``), the trackers they log to (``keel.integrations.trackers``). docs/integrations.md."""
