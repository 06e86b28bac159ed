"""The WeatherMixer model, its optimizer and its training loop."""
