"""Reports: tables and figures from study results (issue 6)."""
