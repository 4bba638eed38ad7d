"""A template build from inputs to promotion (pipeline), the plan of what needs one, and the repair of what dead runs left."""
