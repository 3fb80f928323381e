"""What people read: a run's report (Markdown, HTML, loss plot) and the comparison of runs."""
