"""Operations: systemd, metrics, logs, the loop monitor and the reference docs."""
