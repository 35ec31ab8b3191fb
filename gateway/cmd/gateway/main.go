// Command gateway is Parley's REST/JSON front door: a grpc-gateway v2 reverse proxy that turns the
// google.api.http annotations of the four v1 services into HTTP routes and forwards them over gRPC.
//
//	gateway -listen :8080 -chat-addr chat:50050 -memory-addr memory:50051 ...
//
// JSON uses proto field names and always emits every field (`{"response":…,"model":…,"tokens_used":…}`);
// unknown request fields are rejected with 400; errors are google.rpc.Status JSON with the gRPC code mapped to an
// HTTP status; server-streaming routes answer newline-delimited JSON (`{"result":{…}}` per message, then
// `{"error":{…}}` if the stream fails). The `Authorization` and `X-Request-Id` headers become the `authorization`
// and `x-request-id` gRPC metadata (a request id is generated when the client sends none, and returned in the
// `X-Request-Id` response header). /livez, /readyz (gRPC health of every upstream) and /openapi.json are served
// beside the API.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"net/textproto"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	_ "google.golang.org/genproto/googleapis/rpc/errdetails" // resolves ErrorInfo/BadRequest/RetryInfo in error details
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	chatv1 "parley/gateway/gen/parley/chat/v1"
	inferencev1 "parley/gateway/gen/parley/inference/v1"
	memoryv1 "parley/gateway/gen/parley/memory/v1"
	toolsv1 "parley/gateway/gen/parley/tools/v1"
	"parley/gateway/openapi"
)

const (
	defaultUpstream = "127.0.0.1:50050" // `parley up` serves all four services on one port
	maxMessageBytes = 32 << 20          // same limit as the Python services (parley/runtime/clients.py)
)

// upstream is one proxied gRPC service.
type upstream struct {
	name     string // memory, inference, tools, chat
	fullName string // proto service name, for gRPC health checks
	addr     string
	register func(context.Context, *runtime.ServeMux, *grpc.ClientConn) error
}

// envOr returns the first non-empty environment variable of names, or def.
func envOr(def string, names ...string) string {
	for _, n := range names {
		if v := strings.TrimSpace(os.Getenv(n)); v != "" {
			return v
		}
	}
	return def
}

func main() {
	listen := flag.String("listen", envOr("127.0.0.1:8080", "PARLEY_GATEWAY_LISTEN"),
		"HTTP listen address (env PARLEY_GATEWAY_LISTEN); in a container :8080")
	ups := []*upstream{
		{name: "chat", fullName: "parley.chat.v1.ChatService", register: chatv1.RegisterChatServiceHandler},
		{name: "memory", fullName: "parley.memory.v1.MemoryService", register: memoryv1.RegisterMemoryServiceHandler},
		{name: "inference", fullName: "parley.inference.v1.InferenceService", register: inferencev1.RegisterInferenceServiceHandler},
		{name: "tools", fullName: "parley.tools.v1.ToolsService", register: toolsv1.RegisterToolsServiceHandler},
	}
	addrFlags := map[string]*string{}
	for _, u := range ups {
		env := "PARLEY_GATEWAY_" + strings.ToUpper(u.name) + "_ADDR"
		addrFlags[u.name] = flag.String(u.name+"-addr", envOr(defaultUpstream, env),
			fmt.Sprintf("host:port of the %s service (env %s)", u.name, env))
	}
	only := flag.String("services", envOr("chat,memory,inference,tools", "PARLEY_GATEWAY_SERVICES"),
		"comma-separated services whose routes are exposed (env PARLEY_GATEWAY_SERVICES). Only chat authenticates "+
			"callers; expose memory, inference and tools to trusted networks only")
	probe := flag.String("probe", "", "health-probe mode: GET this path (e.g. /livez) on -listen, exit 0 on 200 (for containers without curl)")
	maxBody := flag.Int64("max-body-bytes", 8<<20, "largest request body accepted")
	timeout := flag.Duration("timeout", 0, "deadline of a proxied call when the client sends no Grpc-Timeout (0: none)")
	logJSON := flag.Bool("log-json", envOr("true", "PARLEY_GATEWAY_LOG_JSON") != "false", "JSON access log lines (env PARLEY_GATEWAY_LOG_JSON)")
	flag.Parse()

	var handler slog.Handler = slog.NewTextHandler(os.Stderr, nil)
	if *logJSON {
		handler = slog.NewJSONHandler(os.Stderr, nil)
	}
	log := slog.New(handler)

	if *probe != "" {
		os.Exit(runProbe(*listen, *probe))
	}
	exposed := map[string]bool{}
	for _, name := range strings.Split(*only, ",") {
		if name = strings.TrimSpace(name); name != "" {
			exposed[name] = true
		}
	}
	var selected []*upstream
	for _, u := range ups {
		u.addr = *addrFlags[u.name]
		if exposed[u.name] {
			selected = append(selected, u)
			delete(exposed, u.name)
		}
	}
	for name := range exposed {
		log.Error("unknown service in -services", "service", name)
		os.Exit(2)
	}
	ups = selected
	if *timeout > 0 {
		runtime.DefaultContextTimeout = *timeout
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	mux, conns, err := newMux(ctx, ups)
	if err != nil {
		log.Error("setup failed", "error", err)
		os.Exit(1)
	}
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()

	root := http.NewServeMux()
	root.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, 200, map[string]string{"status": "ok"}) })
	ready := readiness(ups, conns)
	root.HandleFunc("/readyz", ready)
	root.HandleFunc("/healthz", ready)
	root.HandleFunc("/openapi.json", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(openapi.Spec)
	})
	root.Handle("/", mux)

	srv := &http.Server{
		Addr:              *listen,
		Handler:           withRequestID(withNDJSON(withAccessLog(log, withBodyLimit(*maxBody, root)))),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
	}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	upstreams := map[string]string{}
	for _, u := range ups {
		upstreams[u.name] = u.addr
	}
	log.Info("listening", "address", *listen, "upstreams", upstreams)
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error("serve failed", "error", err)
		os.Exit(1)
	}
}

// newMux registers the four services on one ServeMux, one gRPC connection per distinct address.
func newMux(ctx context.Context, ups []*upstream) (*runtime.ServeMux, map[string]*grpc.ClientConn, error) {
	jsonpb := &runtime.JSONPb{
		MarshalOptions:   protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true},
		UnmarshalOptions: protojson.UnmarshalOptions{DiscardUnknown: false}, // unknown fields: 400
	}
	mux := runtime.NewServeMux(
		runtime.WithMarshalerOption(runtime.MIMEWildcard, jsonpb),
		runtime.WithIncomingHeaderMatcher(incomingHeader),
		runtime.WithOutgoingHeaderMatcher(outgoingHeader),
	)
	conns := map[string]*grpc.ClientConn{}
	for _, u := range ups {
		conn, ok := conns[u.addr]
		if !ok {
			var err error
			conn, err = grpc.NewClient(u.addr,
				grpc.WithTransportCredentials(insecure.NewCredentials()),
				// round robin over every address the name resolves to (a headless Kubernetes Service)
				grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
				grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessageBytes), grpc.MaxCallSendMsgSize(maxMessageBytes)),
			)
			if err != nil {
				return nil, nil, fmt.Errorf("%s upstream %q: %w", u.name, u.addr, err)
			}
			conns[u.addr] = conn
		}
		if err := u.register(ctx, mux, conn); err != nil {
			return nil, nil, fmt.Errorf("register %s: %w", u.name, err)
		}
	}
	return mux, conns, nil
}

// incomingHeader maps HTTP headers to gRPC metadata. `Authorization` is passed as `authorization` by
// grpc-gateway itself; X-Request-Id becomes `x-request-id`; the rest follows grpc-gateway's default
// (Grpc-Metadata-* forwarded without the prefix, permanent HTTP headers as grpcgateway-*).
func incomingHeader(key string) (string, bool) {
	switch textproto.CanonicalMIMEHeaderKey(key) {
	case "X-Request-Id":
		return "x-request-id", true
	case "Authorization":
		return "", false // already forwarded as `authorization`; do not send it twice
	}
	return runtime.DefaultHeaderMatcher(key)
}

// outgoingHeader maps gRPC response metadata to HTTP headers as Grpc-Metadata-*; x-request-id is left out
// because withRequestID already answers it as X-Request-Id (the services return it in gRPC trailers).
func outgoingHeader(key string) (string, bool) {
	if key == "x-request-id" {
		return "", false
	}
	return runtime.MetadataHeaderPrefix + key, true
}

// withRequestID gives every request an X-Request-Id (the client's, or a new one) so the gateway's log line and
// all four services' log lines carry the same id, and answers it in the X-Request-Id response header whatever
// the outcome (the services echo the same id as `x-request-id` trailing metadata).
func withRequestID(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("X-Request-Id")
		if id == "" || len(id) > 128 {
			var b [16]byte
			_, _ = rand.Read(b[:])
			id = hex.EncodeToString(b[:])
			r.Header.Set("X-Request-Id", id)
		}
		w.Header().Set("X-Request-Id", id)
		next.ServeHTTP(w, r)
	})
}

func withBodyLimit(limit int64, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil {
			r.Body = http.MaxBytesReader(w, r.Body, limit)
		}
		next.ServeHTTP(w, r)
	})
}

// isStreaming reports whether a route is server-streaming (answered as newline-delimited JSON).
func isStreaming(path string) bool {
	return strings.HasSuffix(path, ":stream") || strings.HasSuffix(path, ":streamGenerate")
}

// ndjsonWriter labels streaming answers application/x-ndjson (grpc-gateway writes one JSON object per line).
type ndjsonWriter struct {
	http.ResponseWriter
	once sync.Once
}

func (w *ndjsonWriter) fix() {
	w.once.Do(func() {
		if strings.HasPrefix(w.Header().Get("Content-Type"), "application/json") {
			w.Header().Set("Content-Type", "application/x-ndjson")
		}
	})
}
func (w *ndjsonWriter) WriteHeader(code int)        { w.fix(); w.ResponseWriter.WriteHeader(code) }
func (w *ndjsonWriter) Write(b []byte) (int, error) { w.fix(); return w.ResponseWriter.Write(b) }
func (w *ndjsonWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
func (w *ndjsonWriter) Flush()                      { w.fix(); http.NewResponseController(w.ResponseWriter).Flush() }

func withNDJSON(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isStreaming(r.URL.Path) {
			w = &ndjsonWriter{ResponseWriter: w}
		}
		next.ServeHTTP(w, r)
	})
}

// statusWriter remembers the status code for the access log.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}
func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
func (w *statusWriter) Flush()                      { http.NewResponseController(w.ResponseWriter).Flush() }

func withAccessLog(log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		next.ServeHTTP(sw, r)
		if r.URL.Path == "/livez" || r.URL.Path == "/readyz" || r.URL.Path == "/healthz" {
			return
		}
		log.Info("http", "method", r.Method, "path", r.URL.Path, "status", sw.code,
			"duration_ms", float64(time.Since(start).Microseconds())/1000, "request_id", r.Header.Get("X-Request-Id"))
	})
}

// readiness answers 200 when every upstream reports SERVING for its service over gRPC health, else 503.
func readiness(ups []*upstream, conns map[string]*grpc.ClientConn) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		type result struct{ name, status string }
		results := make(chan result, len(ups))
		for _, u := range ups {
			go func(u *upstream) {
				resp, err := healthpb.NewHealthClient(conns[u.addr]).Check(ctx, &healthpb.HealthCheckRequest{Service: u.fullName})
				switch {
				case status.Code(err) == codes.NotFound:
					results <- result{u.name, "SERVICE_UNKNOWN"} // the server at addr does not host it
				case err != nil:
					results <- result{u.name, "UNREACHABLE"}
				default:
					results <- result{u.name, resp.GetStatus().String()}
				}
			}(u)
		}
		services := map[string]string{}
		code, overall := http.StatusOK, "SERVING"
		for range ups {
			res := <-results
			services[res.name] = res.status
			if res.status != "SERVING" {
				code, overall = http.StatusServiceUnavailable, "NOT_SERVING"
			}
		}
		writeJSON(w, code, map[string]any{"status": overall, "services": services})
	}
}

// runProbe GETs path on the local listen address; 0 when it answers 200.
func runProbe(listen, path string) int {
	host := listen
	if strings.HasPrefix(host, ":") {
		host = "127.0.0.1" + host
	}
	client := http.Client{Timeout: 3 * time.Second}
	resp, err := client.Get("http://" + host + path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintln(os.Stderr, resp.Status)
		return 1
	}
	return 0
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
