"""Provider adapters: each turns the normalised request into its wire format and back."""
