"""LaMP data: the benchmark's file format (`lamp`) and a synthetic generator (`synthetic`)."""
