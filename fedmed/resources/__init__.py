"""Files shipped with fedmed: the demo federation's run config (`fedmed demo`)."""
