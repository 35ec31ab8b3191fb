// The Parley REST gateway. With the Go module proxy: `go mod tidy && go build ./cmd/gateway` (the Dockerfile).
// Without it (this repository's CI): gateway/build.sh builds the same sources in GOPATH mode against Debian's
// packaged libraries; there this file only has to exist (it enables Go's .../v2/... import path mapping).
// The versions below are the ones the Debian trixie packages carry, i.e. the ones the tests ran against.
module parley/gateway

go 1.22

require (
	github.com/grpc-ecosystem/grpc-gateway/v2 v2.20.0
	google.golang.org/grpc v1.64.0
	google.golang.org/protobuf v1.36.5
)
