"""The course machinery: student copies from the solutions, papermill runs, and exercise checks."""
