<?php
// HTTP events of Lambda's front doors, turned into FastCGI parameters and
// back: API Gateway REST APIs (payload 1.0), HTTP APIs and Function URLs
// (payload 2.0), and Application Load Balancers with and without
// multi-value headers.

declare(strict_types=1);

namespace PhpLambdaLayers\Runtime;

/** The shape of an HTTP event, which decides the shape of the response. */
enum EventFormat
{
    /** API Gateway REST API, or an HTTP API with payload format 1.0. */
    case ApiGatewayV1;
    /** HTTP API with payload format 2.0, or a Function URL. */
    case ApiGatewayV2;
    case Alb;
}

/** One HTTP request taken from an event. */
final class HttpRequest
{
    /**
     * @param array<string, list<string>> $headers lower-case names
     * @param array<mixed> $requestContext
     */
    public function __construct(
        public readonly EventFormat $format,
        public readonly bool $multiValue,
        public readonly string $method,
        public readonly string $path,
        public readonly string $query,
        public readonly array $headers,
        public readonly string $body,
        public readonly string $remoteAddress,
        public readonly array $requestContext,
        public readonly string $protocol,
    ) {
    }

    /**
     * Reads an event, or throws a RuntimeError naming what is missing.
     *
     * @param mixed $event the decoded JSON event
     */
    public static function fromEvent(mixed $event): self
    {
        if (!is_array($event)) {
            throw new RuntimeError('Runtime.InvalidEvent', 'The fpm layer serves HTTP events; this event is ' . get_debug_type($event));
        }
        $context = is_array($event['requestContext'] ?? null) ? $event['requestContext'] : [];
        if (($event['version'] ?? null) === '2.0' && is_array($context['http'] ?? null)) {
            return self::fromV2($event, $context);
        }
        if (!isset($event['httpMethod'])) {
            throw new RuntimeError(
                'Runtime.InvalidEvent',
                'The fpm layer serves HTTP events from API Gateway, Function URLs and load balancers; this event has neither '
                    . '`httpMethod` nor `requestContext.http` (its keys: ' . implode(', ', array_keys($event)) . ')',
            );
        }
        $alb = isset($context['elb']);
        $multiValue = is_array($event['multiValueHeaders'] ?? null);
        $headers = $multiValue
            ? self::headerLists($event['multiValueHeaders'])
            : self::headerLists(array_map(fn ($value) => [$value], (array) ($event['headers'] ?? [])));
        $queryValues = is_array($event['multiValueQueryStringParameters'] ?? null)
            ? $event['multiValueQueryStringParameters']
            : array_map(fn ($value) => [$value], (array) ($event['queryStringParameters'] ?? []));
        $pairs = [];
        foreach ($queryValues as $name => $values) {
            foreach ((array) $values as $value) {
                // API Gateway decodes the query string, while a load balancer
                // passes it as the client sent it.
                $pairs[] = $alb
                    ? ($value === '' ? (string) $name : "$name=$value")
                    : rawurlencode((string) $name) . '=' . rawurlencode((string) $value);
            }
        }
        // A load balancer appends the client's address to the
        // X-Forwarded-For the client sent, so only the last entry is its own.
        $forwardedFor = explode(',', implode(',', $headers['x-forwarded-for'] ?? []));
        $remote = $alb
            ? trim(end($forwardedFor))
            : (string) ($context['identity']['sourceIp'] ?? '');
        return new self(
            $alb ? EventFormat::Alb : EventFormat::ApiGatewayV1,
            $multiValue,
            strtoupper((string) $event['httpMethod']),
            (string) ($event['path'] ?? '/'),
            implode('&', $pairs),
            $headers,
            self::body($event),
            $remote === '' ? '127.0.0.1' : $remote,
            $context,
            (string) ($context['protocol'] ?? 'HTTP/1.1'),
        );
    }

    /**
     * @param array<mixed> $event
     * @param array<mixed> $context
     */
    private static function fromV2(array $event, array $context): self
    {
        $headers = self::headerLists(array_map(fn ($value) => [$value], (array) ($event['headers'] ?? [])));
        if (is_array($event['cookies'] ?? null) && $event['cookies'] !== []) {
            $headers['cookie'] = [implode('; ', $event['cookies'])];
        }
        $http = $context['http'];
        return new self(
            EventFormat::ApiGatewayV2,
            false,
            strtoupper((string) ($http['method'] ?? 'GET')),
            (string) ($event['rawPath'] ?? $http['path'] ?? '/'),
            (string) ($event['rawQueryString'] ?? ''),
            $headers,
            self::body($event),
            (string) ($http['sourceIp'] ?? '127.0.0.1'),
            $context,
            (string) ($http['protocol'] ?? 'HTTP/1.1'),
        );
    }

    /**
     * @param array<mixed> $headers name => list of values
     * @return array<string, list<string>>
     */
    private static function headerLists(array $headers): array
    {
        $lists = [];
        foreach ($headers as $name => $values) {
            foreach ((array) $values as $value) {
                $lists[strtolower((string) $name)][] = (string) $value;
            }
        }
        return $lists;
    }

    /** @param array<mixed> $event */
    private static function body(array $event): string
    {
        $body = (string) ($event['body'] ?? '');
        if (($event['isBase64Encoded'] ?? false) === true) {
            $decoded = base64_decode($body, true);
            if ($decoded === false) {
                throw new RuntimeError('Runtime.InvalidEvent', 'Invalid event: isBase64Encoded is true, but the body is not valid base64');
            }
            return $decoded;
        }
        return $body;
    }

    /**
     * The FastCGI parameters of this request for the script `$script`.
     *
     * @return array<string, string>
     */
    public function fastCgiParams(string $script, string $documentRoot, Context $context): array
    {
        $host = $this->headers['host'][0] ?? 'localhost';
        $https = strtolower($this->headers['x-forwarded-proto'][0] ?? '') === 'https'
            || $this->format === EventFormat::ApiGatewayV2 && !isset($this->headers['x-forwarded-proto']);
        $port = $this->headers['x-forwarded-port'][0] ?? ($https ? '443' : '80');
        $params = [
            'GATEWAY_INTERFACE' => 'FastCGI/1.0',
            'SERVER_SOFTWARE' => 'php-lambda-layers',
            'SERVER_PROTOCOL' => $this->protocol,
            'SERVER_NAME' => preg_replace('/:\d+$/', '', $host),
            'SERVER_ADDR' => '127.0.0.1',
            'SERVER_PORT' => $port,
            'REMOTE_ADDR' => $this->remoteAddress,
            'REMOTE_PORT' => '0',
            'REQUEST_METHOD' => $this->method,
            'REQUEST_URI' => $this->path . ($this->query === '' ? '' : '?' . $this->query),
            'QUERY_STRING' => $this->query,
            'DOCUMENT_ROOT' => $documentRoot,
            'SCRIPT_FILENAME' => $script,
            'SCRIPT_NAME' => '/' . ltrim(substr($script, strlen($documentRoot)), '/'),
            'PATH_INFO' => $this->path,
            'REQUEST_TIME_FLOAT' => sprintf('%.6F', microtime(true)),
            'LAMBDA_INVOCATION_CONTEXT' => json_encode($context, JSON_FLAGS | JSON_INVALID_UTF8_SUBSTITUTE),
            'LAMBDA_REQUEST_CONTEXT' => json_encode($this->requestContext, JSON_FLAGS | JSON_INVALID_UTF8_SUBSTITUTE),
        ];
        if ($https) {
            $params['HTTPS'] = 'on';
        }
        if ($this->body !== '' || in_array($this->method, ['POST', 'PUT', 'PATCH'], true)) {
            $params['CONTENT_LENGTH'] = (string) strlen($this->body);
        }
        foreach ($this->headers as $name => $values) {
            // `Proxy` would become HTTP_PROXY, which HTTP clients read as
            // their proxy setting. A name with `_` would collide with the
            // same name written with `-`, so it is dropped as nginx does.
            if ($name === 'content-length' || $name === 'proxy' || str_contains($name, '_')) {
                continue;
            }
            $value = implode($name === 'cookie' ? '; ' : ', ', $values);
            if ($name === 'content-type') {
                $params['CONTENT_TYPE'] = $value;
                continue;
            }
            $params['HTTP_' . strtoupper(str_replace('-', '_', $name))] = $value;
        }
        return $params;
    }

    /**
     * The event response for php-fpm's response, in the shape this request's
     * front door expects.
     *
     * @return array<string, mixed>
     */
    public function response(string $fastCgiOutput): array
    {
        $split = strpos($fastCgiOutput, "\r\n\r\n");
        $separator = 4;
        if ($split === false) {
            $split = strpos($fastCgiOutput, "\n\n");
            $separator = 2;
        }
        $head = $split === false ? $fastCgiOutput : substr($fastCgiOutput, 0, $split);
        $body = $split === false ? '' : substr($fastCgiOutput, $split + $separator);

        $status = 200;
        $headers = [];
        foreach (preg_split('/\r?\n/', $head) as $line) {
            $parts = explode(':', $line, 2);
            if (count($parts) !== 2) {
                continue;
            }
            $name = strtolower(trim($parts[0]));
            $value = trim($parts[1]);
            if ($name === 'status') {
                $status = (int) $value;
                continue;
            }
            $headers[$name][] = $value;
        }
        if ($body !== '' && !isset($headers['content-type'])) {
            $headers['content-type'] = ['text/html; charset=UTF-8'];
        }

        $binary = !self::isText($headers['content-type'][0] ?? '', $body) || isset($headers['content-encoding']);
        $response = [
            'statusCode' => $status,
            'body' => $binary ? base64_encode($body) : $body,
            'isBase64Encoded' => $binary,
        ];
        if ($this->format === EventFormat::ApiGatewayV2) {
            if (isset($headers['set-cookie'])) {
                $response['cookies'] = $headers['set-cookie'];
                unset($headers['set-cookie']);
            }
            $response['headers'] = array_map(fn (array $values) => implode(', ', $values), $headers);
        } elseif ($this->multiValue) {
            $response['multiValueHeaders'] = $headers;
        } else {
            // Without multi-value headers only one value per name gets
            // through: keep the last, as a proxy would.
            foreach ($headers as $name => $values) {
                if (count($values) > 1) {
                    log_line(sprintf(
                        'The script sent %d %s headers, but this event format takes one value per header, so only the last one is sent; enable multi-value headers to send all of them',
                        count($values),
                        $name,
                    ));
                }
            }
            $response['headers'] = array_map(fn (array $values) => end($values), $headers);
        }
        if ($this->format === EventFormat::Alb) {
            $response['statusDescription'] = trim($status . ' ' . self::reason($status));
        }
        // An empty map must stay a JSON object.
        foreach (['headers', 'multiValueHeaders'] as $key) {
            if (isset($response[$key]) && $response[$key] === []) {
                $response[$key] = new \stdClass();
            }
        }
        return $response;
    }

    private static function isText(string $contentType, string $body): bool
    {
        $type = strtolower(trim(explode(';', $contentType)[0]));
        $textual = str_starts_with($type, 'text/')
            || in_array($type, ['application/json', 'application/javascript', 'application/xml', 'application/x-www-form-urlencoded', 'image/svg+xml'], true)
            || str_ends_with($type, '+json')
            || str_ends_with($type, '+xml');
        return ($textual || $body === '') && mb_check_encoding($body, 'UTF-8');
    }

    private static function reason(int $status): string
    {
        return [
            200 => 'OK', 201 => 'Created', 202 => 'Accepted', 204 => 'No Content',
            301 => 'Moved Permanently', 302 => 'Found', 303 => 'See Other', 304 => 'Not Modified',
            307 => 'Temporary Redirect', 308 => 'Permanent Redirect',
            400 => 'Bad Request', 401 => 'Unauthorized', 403 => 'Forbidden', 404 => 'Not Found',
            405 => 'Method Not Allowed', 409 => 'Conflict', 410 => 'Gone', 413 => 'Content Too Large',
            422 => 'Unprocessable Content', 429 => 'Too Many Requests',
            500 => 'Internal Server Error', 502 => 'Bad Gateway', 503 => 'Service Unavailable', 504 => 'Gateway Timeout',
        ][$status] ?? '';
    }
}
