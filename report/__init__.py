"""Report builder: `python -m report.build` turns results/ into report/report.pdf."""
