"""`make bench`: kspan's overhead, cost per request, capacity and start-up, measured on this machine."""
