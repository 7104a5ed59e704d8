"""The BraTS metrics, their statistics, and scoring prediction folders against references."""
