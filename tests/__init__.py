"""flowsvc's test suite."""
