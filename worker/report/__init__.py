"""What people read of a run: results files, the HTML report and review list, and the history page."""
